"""Persona-DPO across two Ray nodes: `ray.cluster_utils.Cluster` starts a head and a
second node (one CPU each) on this machine, so Ray Train must put one worker on each.

Its own Ray cluster, so its own pytest process: `make test` runs `pytest -m cluster`
after the main suite (a test session holds one Ray instance).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ helpers

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.skip("a Ray instance is already up in this process: run `pytest -m cluster` on its own")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_dpo_with_one_worker_per_node_completes(two_nodes, tmp_path):
    import ray

    from pipelines.stages.train.stage import run_train
    from test_train import train_config, write_pairs_stage
    from tiny_models import build_all

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    tiny = build_all(tmp_path / "models")
    run_dir = write_pairs_stage(tmp_path / "run")
    summary = run_train(train_config(run_dir, tiny.causal_lm, cpus_per_worker=1, epochs=1))
    assert summary["nodes"] == 2 and summary["workers"] == 2 and summary["steps"] == 4
    assert summary["pairs_per_epoch"] == {"0": {"seen": 16, "repeated": 0, "missing": 0}}
    assert (run_dir / "train" / "model" / "model.safetensors").is_file()
