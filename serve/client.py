"""A Python client for the RLHI endpoints (serve/app.py), for pipelines and scripts.

    client = RLHIClient("http://127.0.0.1:8000", token=os.environ["RLHI_API_TOKEN"])
    client.score(persona, messages, ["answer A", "answer B"])   # -> [0.71, 0.12]

Every call carries a request id (kept across its retries, so server logs line up), a
timeout, and bounded retries (tenacity, over one httpx client) with exponential backoff and
jitter on connection errors and 5xx (a replica restarting answers 503). 4xx are the
caller's to fix and never retried.
Thread-safe: one client may serve many threads; `retries` counts retries across them.
"""
from __future__ import annotations

import threading
import time
import uuid
from typing import Any, Sequence

import httpx
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

RETRY_STATUS = frozenset({500, 502, 503, 504})


class ServeError(RuntimeError):
    """A request that failed for good: a 4xx, or a 5xx / connection error after all retries."""

    def __init__(self, message: str, status: int | None, request_id: str,
                 body: Any = None) -> None:
        super().__init__(f"{message} (status {status}, request id {request_id})")
        self.status, self.request_id, self.body = status, request_id, body


class _Transient(Exception):
    """One attempt that may succeed when tried again (connection error, timeout, 5xx)."""

    def __init__(self, message: str, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.message, self.status, self.body = message, status, body


class RLHIClient:
    """Calls /v1/score, /v1/rewrite, /v1/chat/completions and /healthz."""

    def __init__(self, base_url: str, token: str | None, *, timeout_s: float = 60.0,
                 max_retries: int = 5, backoff_s: float = 0.2, max_backoff_s: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.http = httpx.Client(timeout=timeout_s)  # thread-safe, pools connections
        self._lock = threading.Lock()
        self.retries = 0
        """Retries made so far by this client (all threads)."""

    # ------------------------------------------------------------------ endpoints

    def score(self, persona: str, messages: Sequence[dict], candidates: Sequence[str]) -> list[float]:
        """One score per candidate (higher is better)."""
        body = {"persona": persona, "messages": list(messages), "candidates": list(candidates)}
        return self.post("/v1/score", body)["scores"]

    def rewrite(self, persona: str, messages: Sequence[dict], answer: str,
                feedback: str) -> dict[str, Any]:
        """{"rewrite", "finish_reason", "context_truncated"}."""
        body = {"persona": persona, "messages": list(messages), "answer": answer,
                "feedback": feedback}
        return self.post("/v1/rewrite", body)

    def chat(self, messages: Sequence[dict], user: str | None = None, **params: Any) -> dict[str, Any]:
        """An OpenAI chat.completion; `params`: max_tokens, temperature, top_p, seed,
        conversation_id (the completion carries it, or a new one on a first turn)."""
        return self.post("/v1/chat/completions", {"messages": list(messages), "user": user,
                                                  **params})

    def healthy(self) -> bool:
        """True once every app of the server is running."""
        try:
            return self.http.get(f"{self.base_url}/healthz").is_success
        except httpx.HTTPError:
            return False

    def wait_healthy(self, timeout_s: float = 120.0, poll_s: float = 0.5) -> None:
        """Block until /healthz answers 200, or raise TimeoutError."""
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.base_url}/healthz not ready after {timeout_s} s")
            time.sleep(poll_s)

    # ------------------------------------------------------------------ transport

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST JSON with retries; returns the decoded response or raises ServeError."""
        request_id = uuid.uuid4().hex
        headers = {"X-Request-ID": request_id}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"

        def attempt() -> dict[str, Any]:
            try:
                response = self.http.post(f"{self.base_url}{path}", json=body, headers=headers)
            except httpx.TransportError as exc:  # connection refused or reset, timeouts
                raise _Transient(f"{type(exc).__name__} calling {path}") from exc
            if response.status_code < 400:
                return response.json()
            detail = _json_or_text(response)
            if response.status_code not in RETRY_STATUS:
                raise ServeError(f"{path} refused the request: {detail}", response.status_code, request_id, detail)
            raise _Transient(f"{path} failed: {detail}", response.status_code, detail)

        # Full jitter: concurrent clients that failed together do not retry together.
        retrying = Retrying(stop=stop_after_attempt(self.max_retries + 1), reraise=True,
                            wait=wait_random_exponential(multiplier=self.backoff_s, max=self.max_backoff_s),
                            retry=retry_if_exception_type(_Transient), before_sleep=lambda _: self._count_retry())
        try:
            return retrying(attempt)
        except _Transient as last:
            raise ServeError(f"{last.message}; gave up after {self.max_retries} retries", last.status,
                             request_id, last.body) from None

    def _count_retry(self) -> None:
        with self._lock:
            self.retries += 1


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text[:200]
