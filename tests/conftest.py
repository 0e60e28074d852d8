"""Shared fixtures: one local Ray instance per test session, the bundled data paths."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
WILDCHAT_SAMPLE = DATA / "wildchat" / "train-00000-of-00001.parquet"
FOLLOWUP_LABELS = DATA / "wildchat" / "followup_labels.jsonl"


@pytest.fixture(scope="session")
def ray_session():
    """Start one local Ray for the whole session (start-up costs about 5 s here)."""
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
