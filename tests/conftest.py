"""Shared fixtures: one local Ray instance per test session, the bundled data paths."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
WILDCHAT_SAMPLE = DATA / "wildchat" / "train-00000-of-00001.parquet"
FOLLOWUP_LABELS = DATA / "wildchat" / "followup_labels.jsonl"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server a test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session(s3_bucket):
    """Start one local Ray for the whole session (start-up costs about 5 s here). It starts
    after the S3-compatible server, so its workers see the store's endpoint and credentials
    in their environment, as a cluster's nodes do."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def wildchat_sample() -> Path:
    return WILDCHAT_SAMPLE


# ---- models: tiny fixtures built in code, and the embedded SmolLM2 when present

@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny deterministic Llama/BERT models and tokenizer (tests/tiny_models.py), built once."""
    from tiny_models import build_all

    return build_all(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_engine(tiny_models):
    """One transformers engine on the tiny causal LM, shared by the session."""
    from actors.engines.transformers_engine import TransformersEngine
    from actors.models import ModelSpec

    return TransformersEngine(ModelSpec(id=str(tiny_models.causal_lm), batch_size=4,
                                        max_new_tokens=8))


@pytest.fixture(scope="session")
def smollm2_spec():
    """ModelSpec of the converted SmolLM2-135M-Instruct; skips when `make models` has not run."""
    from actors.models import SMOLLM2, ModelSpec, ModelUnavailableError, resolve_model

    try:
        resolve_model(SMOLLM2)
    except ModelUnavailableError as err:
        pytest.skip(f"SmolLM2 is not available ({err})")
    return ModelSpec(id=SMOLLM2, engine="transformers", max_context_tokens=2048,
                     max_new_tokens=48, temperature=0.0)


@pytest.fixture(scope="session")
def pipeline_run(ray_session, tmp_path_factory):
    """One end-to-end run of every stage so far on the bundled sample, for many tests to
    inspect: (run_dir, {stage: summary})."""
    from pipelines.driver import run_stages
    from pipelines.config import parse_config

    run_dir = tmp_path_factory.mktemp("pipeline-run")
    config = parse_config({"run_dir": str(run_dir), "ingest": {"inputs": [str(WILDCHAT_SAMPLE)]},
                           "resources": {"progress_bars": False},
                           "stages": ["ingest", "followups", "personas"]})
    return run_dir, run_stages(config)


@pytest.fixture(scope="session")
def rewards_run(pipeline_run, tiny_models, tmp_path_factory):
    """The rewards stage on tiny models, on a copy of `pipeline_run` (shared by
    test_rewards.py and test_pairs.py; tests that write copy it first): (config, summary)."""
    import shutil

    from pipelines.config import parse_config
    from pipelines.stages.rewards import run_rewards

    source, _ = pipeline_run
    run_dir = tmp_path_factory.mktemp("rewards-run") / "run"
    shutil.copytree(source, run_dir)
    tiny = {"id": str(tiny_models.causal_lm), "max_new_tokens": 8, "max_context_tokens": 512}
    # The tiny random model never ends an answer: every candidate is cut at 8 tokens.
    config = parse_config({"run_dir": str(run_dir), "resources": {"progress_bars": False},
                           "models": {"policy": tiny, "reward": tiny},
                           "rewards": {"n": 3, "max_prompts": 12, "batch_size": 6, "min_z": 0,
                                       "drop_truncated_chosen": False}})
    return config, run_rewards(config)


@pytest.fixture(scope="session")
def s3_bucket():
    """A real S3-compatible server (moto's standalone server) on 127.0.0.1 with one empty
    bucket; pyarrow and boto3 reach it through AWS_ENDPOINT_URL (set for the session, and so
    for the Ray workers started after it). Yields "s3://<bucket>"."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)   # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket="rlhi-runs")
    yield "s3://rlhi-runs"
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()
