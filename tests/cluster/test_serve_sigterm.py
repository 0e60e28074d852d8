"""`rlhi serve` stopped with SIGTERM, as a process manager stops it: the chat log's open batch
is written before the server goes, and the server says how many conversations it wrote and
lost. A real `rlhi serve` process with its own Ray (so this pytest process), tiny models."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests
import yaml

from tests.conftest import free_port

pytestmark = pytest.mark.cluster
RLHI = str(Path(sys.executable).parent / "rlhi")
TOKEN = "sigterm-test-token-0123456789"


def wait_for_line(process: subprocess.Popen, prefix: str, timeout_s: float) -> list[str]:
    lines, deadline = [], time.time() + timeout_s
    while time.time() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"no line starting {prefix!r} within {timeout_s:g} s: {''.join(lines)[-3000:]}")


def test_sigterm_writes_the_open_batch_and_reports_what_was_written_and_lost(tiny_models, tmp_path):
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray instance is up in this process: run `pytest -m cluster` on its own")
    port, log = free_port(), tmp_path / "chat-log"
    lm = {"id": str(tiny_models.causal_lm), "engine": "transformers", "max_new_tokens": 4}
    config = {"run_dir": str(tmp_path / "run"), "resources": {"num_cpus": 2},
              "models": {"reward": lm, "rewriter": lm, "policy": lm},
              "serve": {"port": port, "max_tokens": 4,
                        "reward": {"enabled": False}, "rewrite": {"enabled": False},
                        # a batch that would wait 10 minutes: only the shutdown writes it
                        "chat": {"num_cpus": 0, "log": {"enabled": True, "folder": str(log),
                                                        "max_batch_conversations": 1000,
                                                        "max_batch_seconds": 600}}}}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RLHI_API_TOKEN": TOKEN}
    server = subprocess.Popen([RLHI, "serve", "--config", str(tmp_path / "serve.yaml")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_line(server, "rlhi serve: chat on", timeout_s=300)
        for conversation in ("c-1", "c-2", "c-3"):
            answer = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120,
                                   headers={"Authorization": f"Bearer {TOKEN}"},
                                   json={"model": "rlhi", "user": "sigterm-user", "conversation_id": conversation,
                                         "messages": [{"role": "user", "content": f"Hello from {conversation}"}]})
            assert answer.status_code == 200, answer.text
        assert list(log.glob("part-*.parquet")) == []     # all three in the open batch
        server.send_signal(signal.SIGTERM)
        output = "".join(wait_for_line(server, "rlhi serve: chat log:", timeout_s=120))
        assert server.wait(timeout=120) == 0
    finally:
        if server.poll() is None:
            server.kill()
    assert "rlhi serve: chat log: 3 conversations written, 0 lost" in output
    rows = pq.read_table(log, columns=["conversation"]).num_rows
    assert rows == 3
