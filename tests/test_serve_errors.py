"""Replica failures become 5xx with a request id, and the gateway keeps answering.

The gateway's FastAPI app is exercised in-process (no Ray): a route awaits a replica call
that dies, hangs or raises, the way a DeploymentResponse would.
"""
from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from serve.app import call_replica, make_fastapi
from serve.guard import token_digest
from serve.schemas import Limits

TOKEN = "unit-token-123"


async def _dies():
    from ray.exceptions import ActorDiedError

    raise ActorDiedError()


async def _raises():
    raise RuntimeError("model blew up on: <private request text>")


async def _hangs():
    await asyncio.sleep(10)


@pytest.fixture(scope="module")
def client():
    app = make_fastapi(Limits(), token_digest(TOKEN), max_body_bytes=1000)
    replies = {"dies": _dies, "raises": _raises, "hangs": _hangs}

    @app.post("/call/{kind}")
    async def call(kind: str):
        if kind == "ok":
            return {"ok": True}
        return await call_replica(replies[kind](), timeout_s=0.2)

    return TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"})


@pytest.mark.parametrize("kind, status", [("dies", 503), ("raises", 500), ("hangs", 504)])
def test_a_failing_replica_gives_a_5xx_with_the_request_id_and_no_request_text(client, kind, status):
    response = client.post(f"/call/{kind}", headers={"X-Request-ID": "req-42"})
    assert response.status_code == status
    assert response.json()["request_id"] == "req-42" == response.headers["x-request-id"]
    assert "private" not in response.text
    assert client.post("/call/ok").json() == {"ok": True}  # and the app keeps serving


def test_a_request_id_is_made_when_the_client_sends_none_or_a_bad_one(client):
    response = client.post("/call/ok", headers={"X-Request-ID": "bad id\twith spaces"})
    assert len(response.headers["x-request-id"]) == 32


def test_a_score_request_must_end_with_the_user_turn():
    from pydantic import ValidationError

    from serve.schemas import build_schemas

    with pytest.raises(ValidationError, match="messages"):
        build_schemas(Limits()).ScoreRequest(
            persona="", candidates=["a"],
            messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])


def test_a_chat_seed_outside_int64_is_a_validation_error_not_a_replica_error():
    from pydantic import ValidationError

    from serve.schemas import build_schemas

    chat = build_schemas(Limits()).ChatRequest
    messages = [{"role": "user", "content": "hi"}]
    for seed in (2**64, -2**63 - 1):
        with pytest.raises(ValidationError, match="seed"):
            chat(messages=messages, seed=seed)
    assert chat(messages=messages, seed=2**63 - 1).seed == 2**63 - 1


def test_a_chat_model_name_is_bounded_it_is_echoed_in_every_streamed_chunk():
    from pydantic import ValidationError

    from serve.schemas import build_schemas

    chat = build_schemas(Limits()).ChatRequest
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValidationError, match="model"):
        chat(messages=messages, model="m" * 257)   # 1 MB here made a 400 MB stream
    assert chat(messages=messages, model="rlhi-policy").model == "rlhi-policy"


def test_the_docs_open_without_a_token_and_declare_the_bearer_token_the_routes_need():
    app = make_fastapi(Limits(), token_digest(TOKEN), max_body_bytes=1000)

    @app.post("/v1/thing")
    async def thing():
        return {"ok": True}

    anonymous = TestClient(app)
    assert anonymous.get("/docs").status_code == 200 and "swagger" in anonymous.get("/docs").text.lower()
    schema = anonymous.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert schema["security"] == [{"bearer": []}]
    assert anonymous.post("/v1/thing").status_code == 401          # the routes still need it
    assert anonymous.post("/v1/thing", headers={"Authorization": f"Bearer {TOKEN}"}).json() == {"ok": True}


def test_chat_takes_messages_as_openai_clients_send_them():
    """A `name` on a message, content as a list of text parts, role `developer`: the openai
    client sends all three, and each was a 422."""
    from pydantic import ValidationError

    from serve.schemas import build_schemas

    chat = build_schemas(Limits(max_chars=20)).ChatRequest
    request = chat(messages=[{"role": "developer", "content": "Be brief.", "name": "ops"},
                             {"role": "user", "name": "ann", "content": [{"type": "text", "text": "Hi"},
                                                                        {"type": "text", "text": "there"}]}])
    assert [m.model_dump() for m in request.messages] == [{"role": "system", "content": "Be brief."},
                                                          {"role": "user", "content": "Hi\nthere"}]
    with pytest.raises(ValidationError, match="messages.0.content"):    # images are not understood
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(ValidationError, match="over 20 characters"):     # the bound holds for parts too
        chat(messages=[{"role": "user", "content": [{"type": "text", "text": "x" * 15}] * 2}])
