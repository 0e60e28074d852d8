"""A newly trained policy goes live in the running application while a client keeps
chatting: every request succeeds, answers switch to the new policy version, and the chat
log records which version answered each turn. Real Serve over HTTP on 127.0.0.1, tiny
models (the second one the first with perturbed weights, so its version differs)."""
from __future__ import annotations

import socket
import threading
import time

import pyarrow.parquet as pq
import pytest
import requests

TOKEN = "redeploy-token-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def retrained_policy(tiny_models, tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("retrained") / "model"
    model = AutoModelForCausalLM.from_pretrained(tiny_models.causal_lm)
    with torch.no_grad():
        model.lm_head.weight.add_(0.01)
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_models.causal_lm).save_pretrained(folder)
    return folder


def chat_config(policy, port: int, log_folder):
    from pipelines.config import parse_config

    lm = {"id": str(policy), "engine": "transformers", "max_new_tokens": 4}
    return parse_config({
        "models": {"policy": lm, "reward": lm, "rewriter": lm},
        "serve": {"port": port, "max_tokens": 4, "reward": {"enabled": False}, "rewrite": {"enabled": False},
                  "chat": {"num_cpus": 0, "log": {"enabled": True, "folder": str(log_folder),
                                                  "max_batch_conversations": 1000, "max_batch_seconds": 600}}}})


def test_a_redeploy_under_load_loses_no_request_and_the_log_records_each_turns_version(
        ray_session, tiny_models, retrained_policy, tmp_path):
    from ray import serve

    from serve.app import APP_NAME, build_app
    from serve.client import RLHIClient
    from serve.guard import token_digest
    from serve.replicas import policy_version
    from serve.run import close_chat_log, redeploy

    port, log = _free_port(), tmp_path / "log"
    before, after = chat_config(tiny_models.causal_lm, port, log), chat_config(retrained_policy, port, log)
    old, new = policy_version(before.models.policy)[0], policy_version(after.models.policy)[0]
    assert old != new
    base = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(before, token_digest(TOKEN)), name=APP_NAME, route_prefix="/")
    try:
        RLHIClient(base, TOKEN).wait_healthy(timeout_s=120)
        answers, stop = [], threading.Event()

        def keep_chatting() -> None:
            turn = 0
            while not stop.is_set():
                turn += 1
                reply = requests.post(f"{base}/v1/chat/completions", timeout=120,
                                      headers={"Authorization": f"Bearer {TOKEN}"},
                                      json={"user": "u1", "conversation_id": f"c-{turn:04d}",
                                            "messages": [{"role": "user", "content": f"turn {turn}"}]})
                answers.append((reply.status_code, reply.json().get("policy_version")))

        client = threading.Thread(target=keep_chatting)
        client.start()
        while len(answers) < 3:
            time.sleep(0.1)
        served = redeploy(after, TOKEN)
        count = len(answers)
        while len(answers) < count + 3:
            time.sleep(0.1)
        stop.set()
        client.join(timeout=120)
        listed = requests.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()
        close_chat_log()
    finally:
        serve.shutdown()
    assert [status for status, _ in answers] == [200] * len(answers)
    versions = [version for _, version in answers]
    switch = versions.index(new)
    assert versions[:switch] == [old] * switch and versions[switch:] == [new] * (len(versions) - switch)
    assert versions[count:] == [new] * (len(versions) - count)     # once redeployed, only the new policy
    assert served["policy_version"] == new and listed["data"][0]["policy_version"] == new
    conversations = pq.read_table(log, columns=["conversation"]).column("conversation").to_pylist()
    logged = {user["content"]: assistant["header"]["user-agent"] for user, assistant in conversations}
    assert logged == {f"turn {i + 1}": version for i, version in enumerate(versions)}   # each turn's own version
