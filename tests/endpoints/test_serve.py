"""The HTTP endpoints over real HTTP on 127.0.0.1, with tiny models: scores, rewrites,
persona-guided chat, tokens, request limits, reward batching and a replica killed under
load. The application is the package's one (tests/endpoints/conftest.py); the OpenAI
client's view of the chat app and the chat log are in test_openai_chat.py.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from endpoints.endpoint_app import CONTEXT, PERSONA_TEXT, TOKEN, post, write_personas


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

    write_personas(tmp_path)
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
    response = post(server[0], "/v1/chat/completions",
                     {"messages": CONTEXT, "user": "u1", "max_tokens": 4, "stream": False})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["persona_id"] == "p-serving"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert PERSONA_TEXT not in response.text and body["usage"]["completion_tokens"] <= 4


def test_chat_for_an_unknown_user_has_no_persona(server):
    response = post(server[0], "/v1/chat/completions", {"messages": CONTEXT, "user": "nobody"})
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
    response = post(server[0], "/v1/score", {}, token=None)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"


def test_a_wrong_token_gets_403(server):
    assert post(server[0], "/v1/score", {}, token="wrong-token-xyz").status_code == 403


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
    response = post(server[0], "/v1/score", body)
    assert response.status_code == status, response.text
    fields = [d["field"] for d in response.json()["detail"]]
    assert any(f.startswith(field) for f in fields), fields
    assert response.json()["request_id"]


def test_an_oversized_body_gets_413_by_content_length(server):
    body = {**GOOD, "candidates": ["x" * 30_000]}
    assert post(server[0], "/v1/score", body).status_code == 413


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
    response = post(server[0], "/v1/chat/completions", {"messages": CONTEXT, "max_tokens": 999})
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "body.max_tokens"


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
