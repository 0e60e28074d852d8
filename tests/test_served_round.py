"""One round of the loop through a real Serve app: users chat with the served policy over
HTTP, the chat log is written, a served_logs round reads exactly the log rows that arrived
(ingest -> followups -> personas -> rewrites -> rewards -> pairs -> train, tiny models), and
the policy it trained goes live (`rlhi redeploy`, from its own process) while a client keeps
chatting: every request answers 200, answers switch to the new policy version once, and the
log records each turn's version.
The next round would take exactly the rows logged since (nothing twice, nothing skipped).
Real Ray, Serve on 127.0.0.1, Ray Data and Ray Train; the ledger itself is tested as plain
functions in test_served_ledger.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import requests

from tests.conftest import WILDCHAT_SAMPLE, free_port

TOKEN = "served-round-token-0123456789"
# user-3, user-14 and user-15 fall in the evaluation split (the hash with seed 0 of the id
# ingest makes of the key, its SHA-256, ranks below eval_fraction 0.2;
# pipelines/stages/personas.py split_users), the others in train.
USERS = ["user-0", "user-3", "user-1", "user-14", "user-2", "user-15", "user-4", "user-5"]
ASKS = ["Write a poem about the sea.", "Explain how a bicycle gear works.", "Give me tips for a job interview.",
        "Describe the water cycle.", "How do I make bread at home?", "What is a hash table?",
        "Summarise the plot of Hamlet.", "Plan a weekend in Lisbon."]
FEEDBACK = "That's way too long. Make it shorter and use bullet points please."


def config_for(run_dir, policy, port: int, log_folder, tiny_models):
    from pipelines.config import parse_config

    tiny = {"id": str(tiny_models.causal_lm), "max_new_tokens": 12}
    return parse_config({
        "run_dir": str(run_dir), "stages": ["ingest", "followups", "personas"],
        "ingest": {"inputs": [str(WILDCHAT_SAMPLE)]},
        "resources": {"progress_bars": False},
        "models": {"policy": {**tiny, "id": str(policy), "engine": "transformers"},
                   "rewriter": tiny, "judge": tiny, "reward": tiny},
        # The tiny random model never ends an answer: every one is cut at max_new_tokens.
        "rewrites": {"batch_size": 4, "filter": {"margin": 0.0, "drop_truncated": False}},
        "rewards": {"n": 3, "batch_size": 8, "min_z": 0.0, "drop_truncated_chosen": False},
        "train": {"workers": 1, "cpus_per_worker": 0.5, "per_device_batch_size": 2, "epochs": 1,
                  "learning_rate": 1e-3, "max_length": 512, "resources_timeout_s": 60},
        "online": {"rounds": 1, "source": "served_logs", "logs": str(log_folder),
                   "stages": ["ingest", "followups", "personas", "rewrites", "rewards", "pairs", "train"]},
        "serve": {"port": port, "max_tokens": 4, "reward": {"enabled": False}, "rewrite": {"enabled": False},
                  "chat": {"num_cpus": 0, "log": {"enabled": True, "folder": str(log_folder),
                                                  "max_batch_conversations": 3, "max_batch_seconds": 600}}},
    })


def chat(base: str, user: str, conversation_id: str, messages: list[dict]) -> requests.Response:
    return requests.post(f"{base}/v1/chat/completions", timeout=120, headers={"Authorization": f"Bearer {TOKEN}"},
                         json={"user": user, "conversation_id": conversation_id, "messages": messages})


def log_rows(folder) -> set[tuple[str, int]]:
    from serve.chat_log import part_paths

    rows = set()
    for path in part_paths(folder):
        table = pq.read_table(path, columns=["conversation_hash", "conversation"])
        rows |= set(zip(table.column(0).to_pylist(), pc.list_value_length(table.column(1)).to_pylist()))
    return rows


def ledger_rows(ledger: dict) -> set[tuple[str, int]]:
    return {(cid, n) for part in ledger["parts"] for cid, n in part["conversations"].items()}


def redeploy_with_the_cli(config, root) -> dict:
    """`rlhi redeploy --config FILE --json` in its own process, joining this session's Ray as
    a user's shell joins the cluster that runs `rlhi serve`: it puts the newest policy the
    run trained live. Returns what it printed as JSON."""
    import ray
    import yaml

    path = root / "serve.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {**os.environ, "RLHI_API_TOKEN": TOKEN, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "redeploy", "--config", str(path), "--json"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def served_round(ray_session, pipeline_run, tiny_models, tmp_path_factory):
    from ray import serve

    from pipelines.driver import run_pipeline
    from pipelines.schema import model_path
    from pipelines.stages.ingest.served import ledger_path, take_new_rows
    from serve.app import APP_NAME, build_app
    from serve.client import RLHIClient
    from serve.guard import token_digest
    from serve.replicas import policy_version
    from serve.run import close_chat_log

    root = tmp_path_factory.mktemp("served-round")
    run_dir, log = root / "run", root / "log"
    shutil.copytree(pipeline_run[0], run_dir)          # round 0: ingest, followups, personas of the sample
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    before = config_for(run_dir, tiny_models.causal_lm, port, log, tiny_models)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(before, token_digest(TOKEN)), name=APP_NAME, route_prefix="/")
    out: dict = {"old": policy_version(before.models.policy)[0]}
    try:
        RLHIClient(base, TOKEN).wait_healthy(timeout_s=120)
        for user, ask in zip(USERS, ASKS):             # each user: a request, then feedback on the answer
            first = chat(base, user, f"{user}-c1", [{"role": "user", "content": ask}])
            answer = first.json()["choices"][0]["message"]["content"]
            chat(base, user, f"{user}-c1", [{"role": "user", "content": ask}, {"role": "assistant", "content": answer},
                                            {"role": "user", "content": FEEDBACK}]).raise_for_status()
        out["logged_before_round"] = log_rows(log)    # complete parts only: the open batch is not visible
        out["results"] = run_pipeline(before, report=False)["stages"]
        out["ledger"] = json.loads(ledger_path(run_dir, 1).read_text())
        after = before.model_copy(update={"models": before.models.model_copy(update={
            "policy": before.models.policy.model_copy(update={"id": str(model_path(run_dir, "train", 1))})})})
        out["new"] = policy_version(after.models.policy)[0]

        answers, stop = [], threading.Event()

        def keep_chatting() -> None:
            turn = 0
            while not stop.is_set():
                turn += 1
                reply = chat(base, "user-0", f"live-{turn:04d}", [{"role": "user", "content": f"turn {turn}"}])
                answers.append((reply.status_code, reply.json().get("policy_version")))

        client = threading.Thread(target=keep_chatting)
        client.start()
        while len(answers) < 3:
            time.sleep(0.1)
        out["served"] = redeploy_with_the_cli(before, root)
        count = len(answers)
        while len(answers) < count + 3:
            time.sleep(0.1)
        stop.set()
        client.join(timeout=120)
        out["answers"], out["answers_after_redeploy"] = answers, answers[count:]
        close_chat_log()
    finally:
        serve.shutdown()
    out["logged"] = log_rows(log)
    out["next_round"] = take_new_rows(log, run_dir, 2)
    out["versions"] = {row["conversation_hash"]: [t["header"]["user-agent"] for t in row["conversation"]
                                                  if t["role"] == "assistant"]
                       for row in pq.read_table(log).to_pylist()}
    out["log_users"] = {ip for row in pq.read_table(log).to_pylist()
                        for ip in [row["hashed_ip"], *(t["hashed_ip"] for t in row["conversation"])] if ip}
    out["run_dir"], out["config"] = run_dir, before
    return out


def test_the_round_read_exactly_the_rows_logged_before_it(served_round):
    ledger, results = served_round["ledger"], served_round["results"]
    assert ledger_rows(ledger) == served_round["logged_before_round"]
    assert ledger["rows"] == len(served_round["logged_before_round"]) >= 6
    ingest = results["round-1/ingest"]["counts"]
    assert ingest["rows_in"] == ledger["rows"] and ingest["served"] == {"parts": len(ledger["parts"]),
                                                                        "rows": ledger["rows"]}
    assert {name: step["status"] for name, step in results.items()} == {
        "ingest": "skipped", "followups": "skipped", "personas": "skipped",     # round 0 is not read again
        **{f"round-1/{name}": "ran" for name in ("ingest", "followups", "personas", "rewrites", "rewards",
                                                  "pairs", "train")}}


def test_the_round_learned_from_the_new_feedback_only_and_kept_the_earlier_split(served_round):
    run_dir = served_round["run_dir"]
    followups = pq.read_table(run_dir / "round-1" / "followups" / "followups").to_pylist()
    assert {f["message"] for f in followups} == {FEEDBACK}
    assert {f["label"] for f in followups} <= {"reattempt_feedback", "complaint", "correction"}
    rewrites = pq.read_table(run_dir / "round-1" / "rewrites" / "rewrites").to_pylist()
    assert sorted(r["followup_id"] for r in rewrites) == sorted(f["followup_id"] for f in followups)
    pairs = pq.read_table(run_dir / "round-1" / "pairs" / "pairs").to_pylist()
    served_ids = {row["conversation_id"] for row in
                  pq.read_table(run_dir / "round-1" / "ingest" / "conversations").to_pylist()}
    assert pairs and {p["conversation_id"] for p in pairs} <= served_ids
    earlier = {u["user_id"]: u["split"] for u in pq.read_table(run_dir / "personas" / "users").to_pylist()}
    now = {u["user_id"]: u["split"] for u in pq.read_table(run_dir / "round-1" / "personas" / "users").to_pylist()}
    served_users = set(pq.read_table(run_dir / "round-1" / "ingest" / "conversations").column("user_id").to_pylist())
    assert {u: now[u] for u in earlier} == earlier and set(now) == set(earlier) | served_users
    assert len(served_users - set(earlier)) >= 4       # the users who chatted are new to the history
    assert served_round["results"]["round-1/train"]["counts"]["train_pairs"] > 0
    assert (run_dir / "round-1" / "train" / "model" / "model.safetensors").is_file()


def test_the_chat_log_keeps_the_hash_of_each_users_key_never_the_key(served_round):
    assert served_round["log_users"] == {hashlib.sha256(user.encode()).hexdigest() for user in USERS}


def test_the_new_policy_went_live_under_load_and_no_request_failed(served_round):
    old, new, answers = served_round["old"], served_round["new"], served_round["answers"]
    assert old != new and served_round["served"]["policy_version"] == new
    assert [status for status, _ in answers] == [200] * len(answers)
    versions = [version for _, version in answers]
    switch = versions.index(new)
    assert versions[:switch] == [old] * switch and versions[switch:] == [new] * (len(versions) - switch)
    assert {v for _, v in served_round["answers_after_redeploy"]} == {new}
    logged = served_round["versions"]
    assert [logged[f"live-{i + 1:04d}"] for i in range(len(versions))] == [[v] for v in versions]


def test_the_next_round_takes_exactly_what_was_logged_since(served_round):
    first, second = ledger_rows(served_round["ledger"]), ledger_rows(served_round["next_round"])
    logged = served_round["logged"]
    assert not first & second and second <= logged                  # nothing twice
    assert logged <= first | second                                 # nothing skipped
    read_before = dict(first)
    for cid, messages in second:                                    # a conversation read before comes
        assert messages > read_before.get(cid, 0)                   # again only with new turns
    assert {f"live-{i + 1:04d}" for i in range(len(served_round["answers"]))} <= {cid for cid, _ in second}


def test_evaluation_reads_every_rounds_conversations_with_the_newest_split_and_personas(served_round):
    from pipelines.persona_join import user_splits
    from pipelines.stages.evaluate.items import user_turns

    run_dir, config = served_round["run_dir"], served_round["config"]
    config = config.model_copy(update={"evaluate": config.evaluate.model_copy(update={"max_turns": 10_000})})
    items = [item for kind in ("first", "followup") for item in user_turns(config)[kind]]
    eval_users = {u for u, split in user_splits(run_dir, 1).items() if split == "eval"}
    served = {row["conversation_id"]: row for row in
              pq.read_table(run_dir / "round-1" / "ingest" / "conversations").to_pylist()}
    from_log = sorted(item.item_id for item in items if item.item_id.rsplit(":", 1)[0] in served)
    expected = sorted(f"{cid}:{i}" for cid, row in served.items() if row["user_id"] in eval_users
                      for i, turn in enumerate(row["turns"]) if turn["role"] == "user")
    assert from_log == expected and len(expected) >= 2     # the logged conversations of held-out users
    personas = {row["persona_id"]: row["persona"] for row in
                pq.read_table(run_dir / "round-1" / "personas" / "personas").to_pylist()}
    links = {row["conversation_id"]: row["persona_id"] for row in
             pq.read_table(run_dir / "round-1" / "personas" / "conversation_personas").to_pylist()}
    assert {item.item_id: item.persona for item in items if item.item_id.rsplit(":", 1)[0] in served} == {
        item_id: personas.get(links.get(item_id.rsplit(":", 1)[0]), "") for item_id in expected}
