"""The chat app as OpenAI clients see it, with the real `openai` client over HTTP on
127.0.0.1: `/v1/models` with the policy version, completions carrying persona, conversation
and version, server-sent-event streaming, `conversation_id` through `extra_body`, tokens
and limits on streams; and the chat log those turns are written to. The application is the
package's one (tests/endpoints/conftest.py).
"""
from __future__ import annotations

import hashlib
import json
import re
import time

import pyarrow.parquet as pq
import pytest
import requests

from endpoints.endpoint_app import CONTEXT, openai_client, post


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
    models = openai_client(server).models.list().data
    config = server[1]
    assert [(m.id, m.object, m.owned_by) for m in models] == [(config.models.policy.id, "model", "rlhi")]
    assert models[0].policy_version == _policy_version(config)
    assert len(models[0].policy_version) == 12


def test_an_openai_completion_carries_persona_conversation_and_policy_version(server):
    from serve.schemas import CONVERSATION_ID

    completion = openai_client(server).chat.completions.create(
        model="rlhi", messages=CONTEXT, user="u1", max_tokens=4, temperature=0)
    assert completion.object == "chat.completion" and completion.choices[0].message.role == "assistant"
    assert completion.persona_id == "p-serving"
    assert completion.policy_version == _policy_version(server[1])
    assert re.match(CONVERSATION_ID, completion.conversation_id)
    assert completion.conversation_id.startswith("conv-") and len(completion.conversation_id) == 37


@pytest.mark.parametrize("user", ["u1", None], ids=["with-user", "without-user"])
def test_streamed_chunks_concatenate_to_the_non_streamed_text(server, user):
    client = openai_client(server)
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
    response = post(server[0], "/v1/chat/completions",
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
    client = openai_client(server)
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
        openai_client(server).chat.completions.create(
            model="rlhi", messages=CONTEXT, stream=stream,
            extra_body={"conversation_id": conversation_id})
    detail = refused.value.response.json()["detail"]
    assert [d["field"] for d in detail] == ["body.conversation_id"]


@pytest.mark.parametrize("stream", [False, True])
def test_the_openai_client_with_a_wrong_or_no_token_is_refused(server, stream):
    import openai

    with pytest.raises(openai.PermissionDeniedError):
        openai_client(server, token="wrong-token-xyz").chat.completions.create(
            model="rlhi", messages=CONTEXT, stream=stream)
    with pytest.raises(openai.AuthenticationError):
        openai_client(server, default_headers={"Authorization": ""}).chat.completions.create(
            model="rlhi", messages=CONTEXT, stream=stream)


def test_models_needs_the_token(server):
    import openai

    with pytest.raises(openai.PermissionDeniedError):
        openai_client(server, token="wrong-token-xyz").models.list()
    assert requests.get(server[0] + "/v1/models", timeout=10).status_code == 401


def test_a_stream_keeps_the_body_limit_and_the_token_bound(server):
    big = {"messages": [{"role": "user", "content": "x" * 30_000}], "stream": True}
    assert post(server[0], "/v1/chat/completions", big).status_code == 413
    response = post(server[0], "/v1/chat/completions",
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
    client = openai_client(server)
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
    user = hashlib.sha256(b"u-log").hexdigest()    # the log keeps the hash of the user's key
    assert [t["hashed_ip"] for t in turns] == [user, None, user, None]
    assert [t["header"] for t in turns] == [None, {"accept-language": None, "user-agent": version},
                                            None, {"accept-language": None, "user-agent": version}]
    stamps = [t["timestamp"] for t in turns]
    assert stamps == sorted(stamps) and row["timestamp"] == stamps[-1]
    ids = [t["turn_identifier"] for t in turns]
    assert ids == sorted(ids) and len(set(ids)) == 4
    assert (row["model"], row["hashed_ip"], row["turn"], row["language"]) == (
        config.models.policy.id, user, 2, "English")


