"""End to end on the bundled WildChat sample with real Ray and tiny models: rewrites,
rewards, pairs, persona-DPO on 2 Ray Train workers, then one online round that samples
with the trained policy and trains again with it as reference.

One session-scoped run (about 3 minutes on 2 cores) that the tests below inspect. It keeps
its run directory in object storage (an S3-compatible server on 127.0.0.1): the shared
ingest/followups/personas are published there from one working copy and pulled into a fresh
one by the run, and a worker of each train step dies once, so Ray Train resumes from a
checkpoint it keeps in the store.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipelines.config import parse_config
from pipelines.stages.rewrites.stage import check_prompt


RUN_URI_PATH = "pipeline-train/run"


@pytest.fixture(scope="module")
def trained_run(pipeline_run, tiny_models, tmp_path_factory, s3_bucket):
    """(the run's working copy, the stage results, the run's RemoteRun)."""
    from pipelines.driver import run_stages
    from pipelines.stages.train.stage import FAIL_AT_STEP_ENV
    from pipelines.storage import RemoteRun

    source, _ = pipeline_run
    uri = f"{s3_bucket}/{RUN_URI_PATH}"
    earlier = RemoteRun(uri, tmp_path_factory.mktemp("pipeline-train") / "earlier")
    shutil.copytree(source, earlier.work_dir, dirs_exist_ok=True)   # the shared stages stay untouched
    for folder in earlier.local_stages():
        earlier.publish(folder)
    run_dir = tmp_path_factory.mktemp("pipeline-train") / "run"
    tiny = {"id": str(tiny_models.causal_lm), "max_new_tokens": 12}
    # The tiny random model never ends an answer: every one is cut at max_new_tokens.
    config = parse_config({
        "run_dir": uri, "work_dir": str(run_dir), "stages": ["rewrites", "rewards", "pairs", "train"],
        "resources": {"progress_bars": False},
        "models": {"policy": tiny, "rewriter": tiny, "judge": tiny, "reward": tiny},
        "rewrites": {"max_followups": 10, "batch_size": 5, "filter": {"margin": 0.0, "drop_truncated": False}},
        "rewards": {"n": 3, "max_prompts": 16, "batch_size": 8, "min_z": 0.5, "drop_truncated_chosen": False},
        "train": {"workers": 2, "cpus_per_worker": 0.5, "per_device_batch_size": 1, "epochs": 1,
                  "save_steps": 1, "learning_rate": 1e-3, "max_length": 1024, "resources_timeout_s": 60,
                  "report_to": ["tensorboard", "mlflow"]},
        "online": {"rounds": 1, "stages": ["rewards", "pairs", "train"]},
    })
    os.environ[FAIL_AT_STEP_ENV] = "2"   # round 0 trains 2 steps, round 1 one
    try:
        results = run_stages(config)
    finally:
        del os.environ[FAIL_AT_STEP_ENV]
    return run_dir, results, RemoteRun(uri, run_dir)


def table(run_dir: Path, *parts: str) -> pd.DataFrame:
    return pq.read_table(run_dir.joinpath(*parts)).to_pandas()


def test_every_stage_and_round_ran(trained_run):
    _, results, _ = trained_run
    assert list(results) == ["rewrites", "rewards", "pairs", "train",
                             "round-1/rewards", "round-1/pairs", "round-1/train"]


def test_pairs_come_from_both_methods_with_lineage(trained_run):
    run_dir, _, _ = trained_run
    pairs = table(run_dir, "pairs", "pairs")
    assert set(pairs["source"]) == {"rewrite", "reward"}
    rewrites = table(run_dir, "rewrites", "rewrites")
    samples = table(run_dir, "rewards", "samples")
    followups = table(run_dir, "followups", "followups").set_index("followup_id")
    from_rewrites = pairs[pairs["source"] == "rewrite"]
    kept = rewrites[rewrites["status"] == "kept"].set_index("followup_id")
    for _, pair in from_rewrites.iterrows():
        source = kept.loc[pair["followup_id"]]
        assert pair["chosen"][0]["content"] == source["chosen"]
        assert pair["rejected"][0]["content"] == source["rejected"]
        assert pair["conversation_id"] == followups.loc[pair["followup_id"], "conversation_id"]
        # the prompt is the policy prompt of the context before the answer: it ends at the
        # answered user turn and the follow-up never enters it (check_prompt raises otherwise)
        followup = followups.loc[pair["followup_id"]]
        check_prompt(list(pair["prompt"]), list(followup["context"]), followup["message"], pair["followup_id"])
        assert pair["prompt"][-1] == followup["context"][-1]
    by_sample = samples.set_index("sample_id")
    for _, pair in pairs[pairs["source"] == "reward"].iterrows():
        sample = by_sample.loc[pair["sample_id"]]
        assert sample["status"] == "kept"
        assert pair["chosen"][0]["content"] in list(sample["candidates"])
        assert pair["chosen"][0]["content"] != pair["rejected"][0]["content"]


def test_pairs_carry_the_persona_built_before_the_turn_and_the_users_split(trained_run):
    run_dir, _, _ = trained_run
    pairs = table(run_dir, "pairs", "pairs")
    personas = table(run_dir, "personas", "personas").set_index("persona_id")
    users = table(run_dir, "personas", "users").set_index("user_id")
    assert (pairs["split"] == users.loc[pairs["user_id"], "split"].to_numpy()).all()
    with_persona = pairs.dropna(subset=["persona_id"])
    assert len(with_persona), "no pair got a persona: the join is not exercised"
    for _, pair in with_persona.iterrows():
        persona = personas.loc[pair["persona_id"]]
        assert persona["user_id"] == pair["user_id"] and not persona["serving"]
        if persona["persona"]:
            assert persona["persona"] in pair["prompt"][0]["content"]   # the persona block


def test_dpo_on_two_workers_saw_each_training_pair_once(trained_run):
    run_dir, results, _ = trained_run
    summary = results["train"]
    in_table = int((table(run_dir, "pairs", "pairs")["split"] == "train").sum())
    assert summary["workers"] == 2 and summary["train_pairs"] > 0
    assert summary["train_pairs"] + summary["left_out_remainder"] <= in_table   # eval pairs never trained on
    assert summary["pairs_per_epoch"] == {"0": {"seen": summary["train_pairs"], "repeated": 0, "missing": 0}}
    assert summary["checkpoints"] and (run_dir / "train" / "model" / "model.safetensors").is_file()


def test_online_round_samples_with_the_trained_policy_and_trains_from_it(trained_run):
    run_dir, results, _ = trained_run
    round_one = run_dir / "round-1"
    exported = str((run_dir / "train" / "model").resolve())
    assert results["round-1/train"]["policy"] == exported         # start and reference
    manifest = json.loads((round_one / "rewards" / "manifest.json").read_text())
    assert exported in json.dumps(manifest["models"])             # sampled with it
    samples = table(round_one, "rewards", "samples")
    assert set(samples["round"]) == {1}
    pairs = table(round_one, "pairs", "pairs")
    assert set(pairs["source"]) == {"reward"} and set(pairs["round"]) == {1}
    assert (round_one / "train" / "model" / "model.safetensors").is_file()


def test_each_train_step_is_an_mlflow_run_with_its_config_metrics_and_exported_policy(trained_run, tmp_path):
    from mlflow import MlflowClient

    from pipelines.tools.report import write_report

    run_dir, results, _ = trained_run
    report = write_report(run_dir, results).read_text()
    for step, folder in (("train", run_dir / "train"), ("round-1/train", run_dir / "round-1" / "train")):
        tracked = results[step]["mlflow"]
        assert tracked["tracking_uri"] == f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
        client = MlflowClient(tracked["tracking_uri"])
        run = client.get_run(tracked["run_id"])
        assert run.info.status == "FINISHED" and run.info.experiment_id == tracked["experiment_id"]
        assert run.info.artifact_uri.startswith((run_dir.resolve() / "mlflow-artifacts").as_uri())
        logged_config = client.download_artifacts(run.info.run_id, "rlhi_config.json",
                                                  str(tmp_path / step.replace("/", "-")))
        assert json.loads(Path(logged_config).read_text())["train"]["report_to"] == ["tensorboard", "mlflow"]
        assert run.data.params["train.learning_rate"] == "0.001" and run.data.params["train.workers"] == "2"
        assert run.data.params["exported_model"] == str(folder / "model")
        logged = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        losses = client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in losses) == [r["step"] for r in logged if "loss" in r]   # every logged step
        assert tracked["run_id"] in report
    assert results["train"]["mlflow"]["run_id"] != results["round-1/train"]["mlflow"]["run_id"]


def test_the_run_of_record_is_in_the_store_and_each_train_step_resumed_from_a_checkpoint_kept_there(
        trained_run, s3_bucket):
    run_dir, results, remote = trained_run
    published = remote.finished_stages()
    assert sorted(published) == ["followups", "ingest", "pairs", "personas", "rewards", "rewrites",
                                 "round-1/pairs", "round-1/rewards", "round-1/train", "train"]
    for folder, manifest in published.items():
        assert manifest == json.loads((run_dir / folder / "manifest.json").read_text())
    for step in ("rewrites", "rewards", "pairs", "train", "round-1/rewards", "round-1/pairs", "round-1/train"):
        assert results[step]["output"] == f"{s3_bucket}/{RUN_URI_PATH}/{step}"
    pairs = pq.read_table(f"{remote.root}/pairs/pairs", filesystem=remote.filesystem)
    assert pairs.num_rows == pq.read_table(run_dir / "pairs" / "pairs").num_rows
    assert results["train"]["resumed_from_step"] == 1     # its worker died at step 2, once
    assert (run_dir / "train" / "storage" / "failed-once").read_text() == "2"
    for step in ("train", "round-1/train"):
        checkpoints = results[step]["checkpoints"]
        assert checkpoints and remote.names(f"{remote.root}/{step}/storage/ray", folders_only=True) == checkpoints
        assert "model.safetensors" in remote.names(f"{remote.root}/{step}/storage/ray/{checkpoints[-1]}/checkpoint")
    leftovers = [name for folder in ("", "/round-1") for name in remote.names(f"{remote.root}{folder}") if ".tmp-" in name]
    assert leftovers == []
    for folder in ("", "round-1/"):   # the checkpoints moved into the published stages
        selector = pafs.FileSelector(f"{remote.root}/{folder}.train-storage", recursive=True, allow_not_found=True)
        assert [info.path for info in remote.filesystem.get_file_info(selector) if "/ray/" in info.path] == []
    assert "mlflow.db" in remote.names(remote.root)


def test_simulated_users_end_to_end(ray_session, tiny_models, tmp_path):
    """Simulated users' logs (5/8) through every stage to a trained policy."""
    from pipelines.driver import run_stages
    from sim.generate import generate_logs
    from test_sim import ScriptedEngine

    sim = tmp_path / "sim"
    generate_logs(12, sim, seed=3, engine=ScriptedEngine(3), log=lambda s: None)
    tiny = {"id": str(tiny_models.causal_lm), "max_new_tokens": 12}
    config = parse_config({
        "run_dir": str(tmp_path / "run"), "ingest": {"inputs": [str(sim / "logs")]},
        "resources": {"progress_bars": False},
        "models": {"policy": tiny, "rewriter": tiny, "judge": tiny, "reward": tiny},
        "rewrites": {"max_followups": 8, "batch_size": 4, "filter": {"margin": 0.0, "drop_truncated": False}},
        "rewards": {"n": 3, "max_prompts": 12, "batch_size": 6, "min_z": 0.5, "drop_truncated_chosen": False},
        "train": {"workers": 1, "per_device_batch_size": 2, "max_steps": 3, "save_steps": 3,
                  "learning_rate": 1e-3, "max_length": 1024, "resources_timeout_s": 60},
    })
    results = run_stages(config)
    assert list(results) == ["ingest", "followups", "personas", "rewrites", "rewards", "pairs", "train"]
    assert results["ingest"]["users"] == 12 and results["followups"]["followups"] > 0
    pairs = table(tmp_path / "run", "pairs", "pairs")
    assert set(pairs["source"]) == {"rewrite", "reward"}
    users = table(tmp_path / "run", "personas", "users").set_index("user_id")
    assert (pairs["split"] == users.loc[pairs["user_id"], "split"].to_numpy()).all()
    assert results["train"]["steps"] == 3 and (tmp_path / "run" / "train" / "model" / "model.safetensors").is_file()
