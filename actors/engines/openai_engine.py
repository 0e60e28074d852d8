"""The OpenAI-compatible HTTP engine: any role played by a model behind `/v1/chat/completions`.

A strong judge the project cannot host (the paper's setting), a vLLM server
(`vllm serve`), or this project's own chat app all speak this protocol. The key comes from
the environment variable `ModelSpec.api_key_env`, never from a config file.

Scoring uses the one log-probability feature hosted APIs share: the top log-probabilities
of the first reply token (`logprobs`, `top_logprobs`). A candidate's score is the
log-probability of the listed token it starts with (the longest such token); a candidate
outside the top list gets the smallest listed value, an upper bound. That is exact for
one-token labels ("Yes"/"No", "A"/"B") and an approximation for longer ones.
"""
from __future__ import annotations

import math
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from actors.engines.base import Completion, Message, SamplingParams
from actors.models import ModelSpec

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
TOP_LOGPROBS = 20  # the most OpenAI's API returns


class OpenAIEngineError(RuntimeError):
    """The server refused the request or kept failing after the retries."""


class OpenAIEngine:
    """GenerationEngine over HTTP, with timeouts and bounded retries with backoff."""

    def __init__(self, spec: ModelSpec) -> None:
        import requests

        if not spec.base_url:
            raise ValueError(f"model {spec.id!r}: engine 'openai' needs base_url")
        self.spec = spec
        self.url = spec.base_url.rstrip("/") + "/chat/completions"
        # No config names the server's context length: assume 8k unless told.
        self.max_context_tokens = spec.max_context_tokens or 8192
        self.session = requests.Session()
        key = os.environ.get(spec.api_key_env)
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"

    # ------------------------------------------------------------------ interface

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """An estimate (no tokenizer on this side): 3 characters a token, which over-counts
        English (about 4) so the budget errs on the safe side, plus the template's markup."""
        return sum(math.ceil(len(m["content"]) / 3) + 4 for m in messages) + 4

    def generate(self, prompts: Sequence[Sequence[Message]],
                 params: SamplingParams) -> list[list[Completion]]:
        return self._map(lambda i_p: self._generate_one(i_p[1], params, i_p[0]),
                         list(enumerate(prompts)))

    def score_continuations(self, prompts: Sequence[Sequence[Message]],
                            continuations: Sequence[Sequence[str]]) -> list[list[float]]:
        tops = self._map(self._first_token_logprobs, list(prompts))
        return [[_match_logprob(cont, top) for cont in conts]
                for conts, top in zip(continuations, tops, strict=True)]

    # ------------------------------------------------------------------ requests

    def _generate_one(self, messages: Sequence[Message], params: SamplingParams,
                      index: int) -> list[Completion]:
        body: dict[str, Any] = {
            "model": self.spec.id, "messages": list(messages),
            "max_tokens": params.max_new_tokens, "temperature": params.temperature,
            "top_p": params.top_p, "n": params.n,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed + index
        reply = self._post(body)
        choices = reply.get("choices") or []
        if len(choices) != params.n:
            raise OpenAIEngineError(f"{self.url} returned {len(choices)} choices for n="
                                    f"{params.n}; set n=1 for servers without n support")
        # Usage is per request: share the completion tokens out evenly between choices.
        used = (reply.get("usage") or {}).get("completion_tokens", 0)
        return [Completion(text=c["message"].get("content") or "",
                           num_tokens=round(used / params.n),
                           finish_reason="length" if c.get("finish_reason") == "length"
                           else "stop")
                for c in choices]

    def _first_token_logprobs(self, messages: Sequence[Message]) -> dict[str, float]:
        reply = self._post({"model": self.spec.id, "messages": list(messages),
                            "max_tokens": 1, "temperature": 0.0, "logprobs": True,
                            "top_logprobs": TOP_LOGPROBS})
        try:
            first = reply["choices"][0]["logprobs"]["content"][0]
        except (KeyError, IndexError, TypeError):
            raise OpenAIEngineError(f"{self.url} returned no logprobs; label-likelihood "
                                    "scoring needs a server that supports top_logprobs") \
                from None
        top = {t["token"]: float(t["logprob"]) for t in first.get("top_logprobs") or []}
        top.setdefault(first["token"], float(first["logprob"]))
        return top

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        import requests

        last = ""
        for attempt in range(self.spec.max_retries + 1):
            if attempt:
                time.sleep(min(8.0, 0.25 * 2 ** attempt) * (0.5 + random.random()))
            try:
                resp = self.session.post(self.url, json=body, timeout=self.spec.timeout_s)
            except (requests.ConnectionError, requests.Timeout) as err:
                last = f"{type(err).__name__}: {err}"
                continue
            if resp.status_code == 200:
                return resp.json()
            last = f"HTTP {resp.status_code}: {resp.text[:300]}"
            if resp.status_code not in RETRY_STATUSES:
                break
        raise OpenAIEngineError(f"model {self.spec.id!r} at {self.url} failed after "
                                f"{attempt + 1} attempt(s): {last}")

    def _map(self, fn: Any, items: list[Any]) -> list[Any]:
        if len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=min(self.spec.batch_size, len(items))) as pool:
            return list(pool.map(fn, items))


def _match_logprob(candidate: str, top: dict[str, float]) -> float:
    """Log-prob of the longest listed first token that `candidate` starts with."""
    matches = [(len(tok.strip()), lp) for tok, lp in top.items()
               if tok.strip() and candidate.strip().startswith(tok.strip())]
    if matches:
        return max(matches)[1]
    return min(top.values()) if top else -math.inf
