"""The stage contract: a stage folder exists only once the stage has finished."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.contract import StageWriter, read_manifest

REPO = Path(__file__).resolve().parents[1]


def test_a_committed_stage_is_published_with_its_manifest(tmp_path):
    with StageWriter(tmp_path, "demo") as stage:
        (stage.tmp / "table.txt").write_text("rows")
        stage.commit(config_hash="abc", inputs=[], counts={"rows": 1}, seed=3)
    manifest = read_manifest(tmp_path, "demo")
    assert (tmp_path / "demo" / "table.txt").read_text() == "rows"
    assert manifest["config_hash"] == "abc" and manifest["seed"] == 3 and manifest["counts"] == {"rows": 1}
    assert set(manifest["code_version"]) == {"package", "source_sha256"}
    assert not list(tmp_path.glob(".demo.tmp-*"))


def test_an_exception_inside_a_stage_publishes_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with StageWriter(tmp_path, "demo") as stage:
            (stage.tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert not (tmp_path / "demo").exists()
    assert read_manifest(tmp_path, "demo") is None


def test_a_rerun_replaces_the_old_output_and_clears_stale_temporaries(tmp_path):
    (tmp_path / ".demo.tmp-1-dead").mkdir(parents=True)
    for value in ("first", "second"):
        with StageWriter(tmp_path, "demo") as stage:
            (stage.tmp / "value.txt").write_text(value)
            stage.commit(config_hash=value, inputs=[], counts={}, seed=0)
    assert (tmp_path / "demo" / "value.txt").read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_a_stage_killed_midway_leaves_no_folder_that_looks_finished(tmp_path):
    """SIGKILL an in-process ingest while it works: only a .tmp folder may remain."""
    from tests.wildchat_rows import sample_rows, write_wildchat

    rows = sample_rows() * 80  # about 4,000 rows: long enough to be killed mid-stage
    data = write_wildchat(tmp_path / "big.parquet", rows)
    run_dir = tmp_path / "run"
    code = ("from pipelines.config import parse_config; from pipelines.stages.ingest.stage import run_ingest; "
            f"run_ingest(parse_config({{'run_dir': {str(run_dir)!r}, 'ingest': {{'inputs': [{str(data)!r}], "
            "'rows_per_task': 100}}), use_ray=False)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    deadline = time.time() + 60
    while time.time() < deadline and not list(run_dir.glob(".ingest.tmp-*/_work/kept/part-000003.parquet")):
        time.sleep(0.05)
    assert proc.poll() is None, "ingest finished before it could be killed; make the input larger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "ingest").exists()
    assert read_manifest(run_dir, "ingest") is None
    assert list(run_dir.glob(".ingest.tmp-*"))
