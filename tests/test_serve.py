"""The HTTP endpoints over real HTTP on 127.0.0.1, with tiny models.

One Serve application is shared by the module (Serve's fixed start-up costs dominate on 2
cores) and shut down at its end so later tests get the CPUs back. Its chat log is on, in a
temporary folder, so the chat tests are logged too (each log test reads its own
conversation). The chat endpoints are also exercised with the real `openai` client.
"""
from __future__ import annotations

import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

TOKEN = "test-token-0123456789"
CONTEXT = [{"role": "user", "content": "Write a short story about a robot."}]
PERSONA_TEXT = "Likes concise answers about robots."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_personas(run_dir):
    from datetime import datetime, timezone

    from pipelines.schema import PERSONAS

    folder = run_dir / "personas" / "personas"
    folder.mkdir(parents=True)
    now = datetime(2024, 1, 1, tzinfo=timezone.utc)
    rows = [{"persona_id": "p-serving", "user_id": "u1", "as_of": now, "persona": PERSONA_TEXT,
             "history_conversations": 3, "history_tokens": 40, "redactions": 0,
             "backend": "extractive", "serving": True},
            {"persona_id": "p-old", "user_id": "u1", "as_of": now, "persona": "old",
             "history_conversations": 1, "history_tokens": 10, "redactions": 0,
             "backend": "extractive", "serving": False}]
    pq.write_table(pa.Table.from_pylist(rows, schema=PERSONAS), folder / "part-0.parquet")


@pytest.fixture(scope="module")
def server(ray_session, tiny_models, tmp_path_factory):
    """(base_url, config) of one running application, chat log on; Serve is shut down
    afterwards."""
    from ray import serve

    from pipelines.config import parse_config
    from serve.app import APP_NAME, build_app
    from serve.guard import token_digest

    run_dir = tmp_path_factory.mktemp("serve-run")
    _write_personas(run_dir)
    lm = {"id": str(tiny_models.causal_lm), "engine": "transformers", "max_new_tokens": 8}
    app_cfg = {"num_cpus": 0, "max_batch_size": 8, "batch_wait_timeout_s": 0.02}
    config = parse_config({
        "run_dir": str(run_dir),
        "models": {"reward": lm, "rewriter": lm, "policy": lm},
        "serve": {"port": _free_port(), "max_candidates": 4, "max_body_bytes": 20_000,
                  "max_tokens": 8, "request_timeout_s": 60,
                  "reward": {**app_cfg, "num_replicas": 2}, "rewrite": app_cfg,
                  "chat": {**app_cfg, "log": {
                      "enabled": True, "folder": str(tmp_path_factory.mktemp("chat-log")),
                      "max_batch_conversations": 64, "max_batch_seconds": 0.3}}}})
    serve.start(http_options={"host": "127.0.0.1", "port": config.serve.port})
    serve.run(build_app(config, token_digest(TOKEN)), name=APP_NAME, route_prefix="/")
    base = f"http://127.0.0.1:{config.serve.port}"
    from serve.client import RLHIClient

    RLHIClient(base, TOKEN).wait_healthy(timeout_s=60)
    yield base, config
    serve.shutdown()


def _post(base, path, body, token=TOKEN, **kwargs):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(base + path, data=data, timeout=60,
                         headers={"Content-Type": "application/json", **headers}, **kwargs)


# ---------------------------------------------------------------- happy paths

def test_score_returns_one_score_per_candidate(server):
    from serve.client import RLHIClient

    scores = RLHIClient(server[0], TOKEN).score("", CONTEXT, ["Once upon a time.", "No."])
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)


def test_rewrite_returns_what_the_rewriter_role_writes_for_the_same_request(server, tiny_models):
    from actors.models import ModelSpec
    from actors.rewriter import Rewriter
    from serve.client import RLHIClient

    out = RLHIClient(server[0], TOKEN).rewrite(PERSONA_TEXT, CONTEXT, "A robot.", "Longer please")
    config = server[1]
    spec = ModelSpec.model_validate(config.models.rewriter.model_dump())
    local = Rewriter(spec.model_copy(update={"max_new_tokens": min(spec.max_new_tokens, config.serve.max_tokens)}))
    expected = local.rewrite(PERSONA_TEXT, CONTEXT, "A robot.", "Longer please")
    assert out["rewrite"] and out["rewrite"] == expected.text  # greedy: the same words
    assert out["finish_reason"] == expected.finish_reason


def test_chat_replica_renders_the_users_serving_persona_into_the_prompt(tiny_models, tmp_path):
    import asyncio

    from serve.replicas import ChatReplica
    from tiny_models import RecordingEngine

    _write_personas(tmp_path)
    lm = {"id": str(tiny_models.causal_lm), "engine": "transformers", "max_new_tokens": 8}
    replica = ChatReplica.func_or_class(lm, "v-test", 8, str(tmp_path))
    replica.sampler.engine = engine = RecordingEngine(replica.sampler.engine)
    known = asyncio.run(replica.complete("u1", CONTEXT, 4, None, None, 0))
    unknown = asyncio.run(replica.complete("nobody", CONTEXT, 4, None, None, 0))
    with_persona, without = (" ".join(m["content"] for m in prompt) for prompt in engine.prompts)
    assert known["persona_id"] == "p-serving" and unknown["persona_id"] is None
    assert PERSONA_TEXT in with_persona and "old" not in with_persona.split()  # the serving row, not the snapshot
    assert PERSONA_TEXT not in without and CONTEXT[0]["content"] in without


def test_chat_uses_the_serving_persona_and_returns_its_id_never_its_text(server):
    response = _post(server[0], "/v1/chat/completions",
                     {"messages": CONTEXT, "user": "u1", "max_tokens": 4, "stream": False})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["persona_id"] == "p-serving"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert PERSONA_TEXT not in response.text and body["usage"]["completion_tokens"] <= 4


def test_chat_for_an_unknown_user_has_no_persona(server):
    response = _post(server[0], "/v1/chat/completions", {"messages": CONTEXT, "user": "nobody"})
    assert response.status_code == 200 and response.json()["persona_id"] is None


def test_healthz_needs_no_token_and_reveals_nothing(server):
    response = requests.get(server[0] + "/healthz", timeout=10)
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_openapi_documents_every_endpoint(server):
    response = requests.get(server[0] + "/openapi.json", timeout=10,
                            headers={"Authorization": f"Bearer {TOKEN}"})
    paths = response.json()["paths"]
    assert {"/v1/score", "/v1/rewrite", "/v1/chat/completions", "/v1/models"} <= set(paths)


# ---------------------------------------------------------------- auth

def test_a_request_without_a_token_gets_401(server):
    response = _post(server[0], "/v1/score", {}, token=None)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"


def test_a_wrong_token_gets_403(server):
    assert _post(server[0], "/v1/score", {}, token="wrong-token-xyz").status_code == 403


# ---------------------------------------------------------------- bad requests

GOOD = {"persona": "", "messages": CONTEXT, "candidates": ["a"]}


@pytest.mark.parametrize("body, status, field", [
    (b"{not json", 400, "body"),
    ({k: v for k, v in GOOD.items() if k != "candidates"}, 422, "body.candidates"),
    ({**GOOD, "candidates": "a"}, 422, "body.candidates"),
    ({**GOOD, "persona": 5}, 422, "body.persona"),
    ({**GOOD, "candidates": ["a"] * 5}, 422, "body.candidates"),
    ({**GOOD, "candidates": []}, 422, "body.candidates"),
    ({**GOOD, "candidates": [""]}, 422, "body.candidates.0"),
    ({**GOOD, "messages": []}, 422, "body.messages"),
    ({**GOOD, "messages": [{"role": "robot", "content": "x"}]}, 422, "body.messages.0.role"),
    ({**GOOD, "messages": [*CONTEXT, {"role": "assistant", "content": "x"}]}, 422,
     "body.messages"),
    ({**GOOD, "temperature": 0.5}, 422, "body.temperature"),
], ids=["malformed-json", "missing-field", "wrong-type", "wrong-type-persona",
        "too-many-candidates", "empty-candidates", "empty-candidate", "empty-messages",
        "bad-role", "no-user-turn-last", "unknown-field"])
def test_a_bad_request_gets_a_4xx_naming_the_field(server, body, status, field):
    response = _post(server[0], "/v1/score", body)
    assert response.status_code == status, response.text
    fields = [d["field"] for d in response.json()["detail"]]
    assert any(f.startswith(field) for f in fields), fields
    assert response.json()["request_id"]


def test_an_oversized_body_gets_413_by_content_length(server):
    body = {**GOOD, "candidates": ["x" * 30_000]}
    assert _post(server[0], "/v1/score", body).status_code == 413


def test_an_oversized_chunked_body_gets_413_while_streaming(server):
    def chunks():
        yield b'{"persona": "'
        for _ in range(30):
            yield b"x" * 1000
        yield b'"}'

    response = requests.post(server[0] + "/v1/score", data=chunks(), timeout=30,
                             headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 413


def test_chat_max_tokens_over_the_bound_is_refused(server):
    response = _post(server[0], "/v1/chat/completions", {"messages": CONTEXT, "max_tokens": 999})
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "body.max_tokens"


# ---------------------------------------------------------------- the openai client

def _openai(server, token=TOKEN, **kwargs):
    import openai

    return openai.OpenAI(base_url=server[0] + "/v1", api_key=token, max_retries=0, timeout=60,
                         **kwargs)


def _policy_version(config) -> str:
    """The policy version as documented: SHA-256 over the weight files' names and bytes."""
    import hashlib
    from pathlib import Path

    folder = Path(config.models.policy.id)
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def test_models_list_returns_the_policy_with_its_version(server):
    models = _openai(server).models.list().data
    config = server[1]
    assert [(m.id, m.object, m.owned_by) for m in models] == [(config.models.policy.id, "model", "rlhi")]
    assert models[0].policy_version == _policy_version(config)
    assert len(models[0].policy_version) == 12


def test_an_openai_completion_carries_persona_conversation_and_policy_version(server):
    from serve.schemas import CONVERSATION_ID

    completion = _openai(server).chat.completions.create(
        model="rlhi", messages=CONTEXT, user="u1", max_tokens=4, temperature=0)
    assert completion.object == "chat.completion" and completion.choices[0].message.role == "assistant"
    assert completion.persona_id == "p-serving"
    assert completion.policy_version == _policy_version(server[1])
    assert re.match(CONVERSATION_ID, completion.conversation_id)
    assert completion.conversation_id.startswith("conv-") and len(completion.conversation_id) == 37


@pytest.mark.parametrize("user", ["u1", None], ids=["with-user", "without-user"])
def test_streamed_chunks_concatenate_to_the_non_streamed_text(server, user):
    client = _openai(server)
    request = {"model": "rlhi", "messages": CONTEXT, "max_tokens": 8, "temperature": 0, "seed": 0,
               **({"user": user} if user else {})}
    whole = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage  # usage last, as asked
    assert [c.usage for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert len({c.conversation_id for c in chunks}) == 1
    assert {c.persona_id for c in chunks} == {"p-serving" if user else None}


def test_a_stream_ends_with_done_and_has_no_usage_unless_asked(server):
    response = _post(server[0], "/v1/chat/completions",
                     {"messages": CONTEXT, "max_tokens": 4, "stream": True}, stream=True)
    lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(line.startswith("data: ") for line in lines)
    assert [e["usage"] for e in events] == [None] * len(events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1]["choices"][0]["delta"] == {}


def test_conversation_id_round_trips_through_extra_body(server):
    client = _openai(server)
    completion = client.chat.completions.create(
        model="rlhi", messages=CONTEXT, max_tokens=2, extra_body={"conversation_id": "my-conv.1"})
    chunks = list(client.chat.completions.create(
        model="rlhi", messages=CONTEXT, max_tokens=2, stream=True,
        extra_body={"conversation_id": "my-conv.1"}))
    assert completion.conversation_id == "my-conv.1"
    assert {c.conversation_id for c in chunks} == {"my-conv.1"}


@pytest.mark.parametrize("conversation_id", ["has space", "x" * 129, "", "semi;colon"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_bad_conversation_id_is_refused_naming_the_field(server, conversation_id, stream):
    import openai

    with pytest.raises(openai.UnprocessableEntityError) as refused:
        _openai(server).chat.completions.create(
            model="rlhi", messages=CONTEXT, stream=stream,
            extra_body={"conversation_id": conversation_id})
    detail = refused.value.response.json()["detail"]
    assert [d["field"] for d in detail] == ["body.conversation_id"]


@pytest.mark.parametrize("stream", [False, True])
def test_the_openai_client_with_a_wrong_or_no_token_is_refused(server, stream):
    import openai

    with pytest.raises(openai.PermissionDeniedError):
        _openai(server, token="wrong-token-xyz").chat.completions.create(
            model="rlhi", messages=CONTEXT, stream=stream)
    with pytest.raises(openai.AuthenticationError):
        _openai(server, default_headers={"Authorization": ""}).chat.completions.create(
            model="rlhi", messages=CONTEXT, stream=stream)


def test_models_needs_the_token(server):
    import openai

    with pytest.raises(openai.PermissionDeniedError):
        _openai(server, token="wrong-token-xyz").models.list()
    assert requests.get(server[0] + "/v1/models", timeout=10).status_code == 401


def test_a_stream_keeps_the_body_limit_and_the_token_bound(server):
    big = {"messages": [{"role": "user", "content": "x" * 30_000}], "stream": True}
    assert _post(server[0], "/v1/chat/completions", big).status_code == 413
    response = _post(server[0], "/v1/chat/completions",
                     {"messages": CONTEXT, "max_tokens": 999, "stream": True})
    assert response.status_code == 422
    assert [d["field"] for d in response.json()["detail"]] == ["body.max_tokens"]


# ---------------------------------------------------------------- the chat log

def _logged(folder, conversation_id, turns, timeout_s=30.0):
    """(the log's tables, the rows of one conversation) once its one row has `turns` user
    turns. The writer may be superseding an older row meanwhile: a part can vanish between
    the glob and the read, or two rows of the conversation can be seen for a moment."""
    from serve.chat_log import part_paths

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            tables = [pq.read_table(p) for p in part_paths(folder)]
        except FileNotFoundError:
            continue
        rows = [r for t in tables for r in t.to_pylist() if r["conversation_hash"] == conversation_id]
        if [r["turn"] for r in rows] == [turns] or time.monotonic() > deadline:
            return tables, rows
        time.sleep(0.1)


def test_two_turns_of_a_conversation_are_logged_as_one_redacted_wildchat_row(server, wildchat_sample):
    config = server[1]
    client = _openai(server)
    first = [{"role": "user", "content": "Mail me at jane.doe@example.com about robots."}]
    one = client.chat.completions.create(model="rlhi", messages=first, user="u-log", max_tokens=4,
                                         extra_body={"conversation_id": "log-conv-1"})
    second = first + [{"role": "assistant", "content": one.choices[0].message.content},
                      {"role": "user", "content": "Shorter, please."}]
    chunks = list(client.chat.completions.create(model="rlhi", messages=second, user="u-log",
                                                 max_tokens=4, stream=True,
                                                 extra_body={"conversation_id": "log-conv-1"}))
    two = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    tables, rows = _logged(config.serve.chat.log.folder, "log-conv-1", turns=2)
    assert {t.schema for t in tables} == {pq.read_schema(wildchat_sample)}
    assert len(rows) == 1  # one row per conversation, as of its latest turn
    row, version = rows[0], _policy_version(config)
    turns = row["conversation"]
    assert [(t["role"], t["content"]) for t in turns] == [
        ("user", "Mail me at <REDACTED_EMAIL> about robots."),
        ("assistant", one.choices[0].message.content), ("user", "Shorter, please."),
        ("assistant", two)]
    assert [t["redacted"] for t in turns] == [True, False, False, False] and row["redacted"] is True
    assert [t["hashed_ip"] for t in turns] == ["u-log", None, "u-log", None]
    assert [t["header"] for t in turns] == [None, {"accept-language": None, "user-agent": version},
                                            None, {"accept-language": None, "user-agent": version}]
    stamps = [t["timestamp"] for t in turns]
    assert stamps == sorted(stamps) and row["timestamp"] == stamps[-1]
    ids = [t["turn_identifier"] for t in turns]
    assert ids == sorted(ids) and len(set(ids)) == 4
    assert (row["model"], row["hashed_ip"], row["turn"], row["language"]) == (
        config.models.policy.id, "u-log", 2, "English")


# ---------------------------------------------------------------- reward batching

@pytest.mark.parametrize("tokens, slots", [(1, 1), (512, 1), (513, 2), (1500, 3),
                                           (16384, 32), (90000, 32)])
def test_a_score_request_takes_batch_slots_by_its_tokens(tokens, slots):
    from serve.replicas import token_slots

    # 32 slots of 16384 / 32 = 512 tokens: a batch closes at 32 requests or 16384 tokens.
    assert token_slots(tokens, max_batch_tokens=16384, max_batch_size=32) == slots


def test_unbatched_every_score_request_fills_a_batch_alone():
    from serve.replicas import token_slots

    assert token_slots(1, max_batch_tokens=16384, max_batch_size=1) == 1
    assert token_slots(90000, max_batch_tokens=16384, max_batch_size=1) == 1


def test_concurrent_score_requests_of_mixed_lengths_each_get_their_own_scores_in_order(
        server, tiny_models):
    """An encoder reward replica tokenizes each request, batches them by tokens and scores
    the rows in length buckets: every caller still gets exactly its candidates' scores."""
    from ray import serve

    from actors.models import ModelSpec
    from actors.reward_model import RewardModel
    from serve.replicas import RewardReplica

    model = {"id": str(tiny_models.encoder_reward), "engine": "transformers", "batch_size": 8}
    # 64-token budget over 4 slots: requests take 1 to 4 slots, so batches hold 1 to 4.
    handle = serve.run(RewardReplica.options(ray_actor_options={"num_cpus": 0},
                                             max_ongoing_requests=32).bind(
        "trained", model, 4, 0.05, 64), name="reward-batching", route_prefix=None)
    requests_ = [(f"persona {i}", [{"role": "user", "content": f"question {i}" * (1 + i % 3)}],
                  [f"answer {i} " * (1 + (i * 7 + k) % 5) for k in range(1 + i % 3)])
                 for i in range(12)]
    try:
        responses = [handle.score.remote(r) for r in requests_]  # all in flight at once
        got = [response.result(timeout_s=120) for response in responses]
    finally:
        serve.delete("reward-batching")
    local = RewardModel("trained", ModelSpec.model_validate(model))
    for request, scores in zip(requests_, got, strict=True):
        assert scores == pytest.approx(local.score(*request), abs=1e-5)


# ---------------------------------------------------------------- robustness

def test_a_replica_killed_under_load_loses_no_request(server):
    """Kill a reward replica while 48 concurrent requests are in flight: every request is
    answered (the gateway returns 503 for the lost ones and the client retries)."""
    import ray

    from serve.client import RLHIClient

    client = RLHIClient(server[0], TOKEN, max_retries=8, backoff_s=0.3, max_backoff_s=3.0)
    # Named actors come from the GCS, so this needs no dashboard (tests run without one).
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::") and "#reward#" in a["name"]]
    assert replicas, "no reward replica found"

    def killer():
        time.sleep(0.3)
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]))

    thread = threading.Thread(target=killer)
    thread.start()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: client.score("", CONTEXT, [f"answer {i}", "b"]),
                                range(48)))
    thread.join()
    assert len(results) == 48 and all(len(r) == 2 for r in results)
    alive = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert replicas[0]["name"] not in alive  # the kill did happen; Serve started a new one
    print(f"\nreplica killed under load: 48/48 answered, {client.retries} client retries")
    client.wait_healthy(timeout_s=60)
