"""What the endpoint tests share: the token, the request they send, the persona they
expect, and how they call the application (tests/endpoints/conftest.py starts it)."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import requests

TOKEN = "test-token-0123456789"
CONTEXT = [{"role": "user", "content": "Write a short story about a robot."}]
PERSONA_TEXT = "Likes concise answers about robots."


def write_personas(run_dir):
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


def post(base, path, body, token=TOKEN, **kwargs):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(base + path, data=data, timeout=60,
                         headers={"Content-Type": "application/json", **headers}, **kwargs)


def openai_client(server, token=TOKEN, **kwargs):
    import openai

    return openai.OpenAI(base_url=server[0] + "/v1", api_key=token, max_retries=0, timeout=60,
                         **kwargs)
