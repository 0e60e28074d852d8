"""`ray job submit` of the driver, as a user runs it on a cluster: a head started with
`ray start --head` on loopback, the driver submitted with the repository as working
directory (uploaded with its exclusions), the job followed to success, its run directory
and logs checked, and the head stopped again. Its own Ray, so its own pytest process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head on 127.0.0.1 with token authentication (Ray 2.60's default)."""
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray instance is up in this process: run `pytest -m cluster` on its own")
    temp = tmp_path_factory.mktemp("ray-head")
    gcs, dashboard, agent = free_port(), free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    started = subprocess.run(
        [RAY, "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp}",
         # the job agent's own port: Ray's default (52365) is taken by any other Ray on the machine
         f"--dashboard-agent-listen-port={agent}",
         "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": env}
    finally:
        stop_head(temp)


def stop_head(temp: Path) -> None:
    """Stop the processes of this head only (`ray stop` would stop every Ray on the machine):
    they are the ones whose command line names its temp dir, and their children."""
    import psutil

    mine = [p for p in psutil.process_iter(["cmdline"]) if str(temp) in " ".join(p.info["cmdline"] or [])]
    family = {c for p in mine for c in p.children(recursive=True)} | set(mine)
    for process in family:
        process.terminate()
    _, alive = psutil.wait_procs(family, timeout=20)
    for process in alive:
        process.kill()


def test_driver_runs_as_a_submitted_job(head, tmp_path):
    config = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    config["stages"] = ["ingest", "followups", "personas"]
    config["resources"]["progress_bars"] = False
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", head["address"], "--working-dir", str(REPO),
         "--submission-id", f"rlhi-test-{int(time.time())}", "--",
         sys.executable, "-m", "pipelines.driver", "--config", str(config_path), "--out", str(run_dir), "--json"],
        env=head["env"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert submit.returncode == 0, (submit.stdout[-3000:], submit.stderr[-3000:])
    assert "succeeded" in submit.stdout.lower() + submit.stderr.lower()
    # the job's logs carry the driver's progress and its JSON summary
    summary = json.loads([line for line in submit.stdout.splitlines() if line.startswith("{")][-1])
    assert set(summary["stages"]) == {"ingest", "followups", "personas"}
    assert all(step["status"] == "ran" for step in summary["stages"].values())
    assert "[personas] done" in submit.stdout
    for stage in ("ingest", "followups", "personas"):
        assert (run_dir / stage / "manifest.json").is_file()
    jobs = subprocess.run([RAY, "job", "list", "--address", head["address"]], env=head["env"],
                          capture_output=True, text=True, timeout=60)
    assert "SUCCEEDED" in jobs.stdout
