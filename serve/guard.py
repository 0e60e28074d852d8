"""The gateway's front door: request ids, bearer-token auth and the body-size limit.

A plain ASGI middleware rather than FastAPI dependencies, so that it acts before any body
is parsed: an unauthenticated or oversized request is answered without the JSON parser
ever seeing it. Bodies are never logged here or anywhere in serve/.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

TOKEN_ENV = "RLHI_API_TOKEN"
# The health check, and the API's documentation (no model, no data; a browser cannot send a
# token to open /docs, nor can Swagger UI to fetch the schema): everything else needs one.
OPEN_PATHS = frozenset({"/healthz", "/docs", "/openapi.json"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class TokenError(ValueError):
    """No usable API token was configured."""


def read_token(token_file: str | None) -> str:
    """The API token from `token_file`, else `$RLHI_API_TOKEN`; refuses an empty one."""
    if token_file:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise TokenError(f"serve.token_file {token_file!r} does not exist")
        token = path.read_text().strip()
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if len(token) < 8:
        raise TokenError(f"no API token: set {TOKEN_ENV} (8 characters or more) or "
                         "serve.token_file; the server refuses to start without one")
    return token


def token_digest(token: str) -> str:
    """SHA-256 of the token: what deployments carry, so the secret itself never sits in
    Serve's stored deployment config or the dashboard."""
    return hashlib.sha256(token.encode()).hexdigest()


def request_id_of(scope: Scope) -> str:
    """The id this request is known by (set by `Guard`)."""
    return scope.get("state", {}).get("request_id", "")


async def send_json(send: Send, status: int, body: dict[str, Any], request_id: str,
                    extra_headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body | {"request_id": request_id}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()),
                            (b"x-request-id", request_id.encode()), *extra_headers]})
    await send({"type": "http.response.body", "body": data})


class Guard:
    """ASGI middleware: request id, then auth (401/403), then body size (413)."""

    def __init__(self, app: Any, digest: str, max_body_bytes: int) -> None:
        self.app = app
        self.digest = digest
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        given = headers.get("x-request-id", "")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        if _route(scope) not in OPEN_PATHS:
            refusal = self._auth_refusal(headers.get("authorization"))
            if refusal:
                status, message = refusal
                await send_json(send, status, {"error": message}, rid,
                                [(b"www-authenticate", b"Bearer")])
                return

        body, too_big = await self._read_body(headers.get("content-length"), receive)
        if too_big:
            await send_json(send, 413, {"error": f"request body over {self.max_body_bytes} "
                                                 "bytes (serve.max_body_bytes)"}, rid)
            return
        await self.app(scope, _replay(body, receive), _with_request_id(send, rid))

    def _auth_refusal(self, header: str | None) -> tuple[int, str] | None:
        if not header or not header.lower().startswith("bearer "):
            return 401, "missing bearer token (Authorization: Bearer <token>)"
        presented = token_digest(header[7:].strip())
        # Constant time over equal-length digests: the comparison leaks nothing.
        if not hmac.compare_digest(presented, self.digest):
            return 403, "wrong token"
        return None

    async def _read_body(self, length: str | None, receive: Receive) -> tuple[bytes, bool]:
        """The whole body, or (b"", True) as soon as it is known to exceed the limit:
        from Content-Length when given, else while it streams in."""
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return b"", True
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return b"", True
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        return b"".join(chunks), False


def _route(scope: Scope) -> str:
    """The path inside this app: Serve mounts an app under its route prefix (root_path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


def _replay(body: bytes, upstream: Receive) -> Receive:
    """The body already read, then the real channel: a streamed response listens on it for
    the client going away, so it must not hear a disconnect that did not happen."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return await upstream()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _with_request_id(send: Send, rid: str) -> Send:
    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
            message = message | {"headers": [*headers, (b"x-request-id", rid.encode())]}
        await send(message)

    return wrapped
