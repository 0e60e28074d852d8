"""The Rewriter and RewardModel roles answered by a running `rlhi serve`, for the stages.

With `rewrites.rewriter_via: serve` / `rewards.reward_via: serve` the Ray Data actors build
`ServedRewriter` / `ServedRewardModel` instead of loading the model themselves. They have
the local roles' batch methods (actors/rewriter.py `rewrite_batch`, actors/reward_model.py
`score_batch`), so the stage code does not change; each batch goes out as one request per
item, a few at a time, so the server's `serve.batch` has concurrent requests to merge.

Only the rewriter and the reward model go to Serve. The policy sampler stays in the pool:
the chat app conditions on a user's *serving* persona, built from all of their history,
while a training prompt must see only the persona from before its turn.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

from actors.prompts import clip_middle
from actors.rewriter import Rewrite
from pipelines.config import RunConfig
from serve.client import RLHIClient
from serve.guard import read_token

EMPTY_ANSWER = "empty_answer"
"""finish_reason of a rewrite not requested because the answer was empty (the API refuses
empty answers); the empty rewrite is then filtered `empty` like any other."""


class ServeUnavailableError(RuntimeError):
    """No healthy RLHI server where the config says one runs."""


@dataclass(frozen=True)
class Endpoint:
    """A running RLHI server as the stages call it (picklable: sent to every actor)."""

    url: str
    token: str = field(repr=False)
    timeout_s: float = 130.0
    max_messages: int = 64
    """The server's serve.max_messages: longer contexts are cut to their last turns."""
    max_chars: int = 100_000
    """The server's serve.max_chars: longer texts are cut in the middle (ingest keeps turns
    of up to ingest.filters.max_chars; the roles clip to their window anyway)."""
    concurrency: int = 4
    """Requests in flight per actor."""

    def client(self) -> RLHIClient:
        return RLHIClient(self.url, self.token, timeout_s=self.timeout_s)


def serve_url(config: RunConfig) -> str:
    """serve.url, else http://{serve.host}:{serve.port}."""
    return (config.serve.url or f"http://{config.serve.host}:{config.serve.port}").rstrip("/")


def connect(config: RunConfig, config_path: str = "<this config>") -> Endpoint:
    """The server of `config.serve`, checked healthy now, before any actor starts.

    The token is read as `rlhi serve` reads it (serve.token_file, else $RLHI_API_TOKEN)."""
    url = serve_url(config)
    token = read_token(config.serve.token_file)
    if not RLHIClient(url, token, timeout_s=5.0).healthy():
        raise ServeUnavailableError(
            f"no healthy RLHI server at {url} (GET {url}/healthz failed or is not 200); start "
            f"one with `rlhi serve --config {config_path}` and wait until it prints its URLs, "
            "or set serve.url to where it runs, or set rewrites.rewriter_via / "
            "rewards.reward_via to `pool`")
    return Endpoint(url, token, timeout_s=config.serve.request_timeout_s + 10.0,
                    max_messages=config.serve.max_messages, max_chars=config.serve.max_chars)


def fit_messages(messages: Sequence[dict], max_messages: int, max_chars: int = 100_000) -> list[dict]:
    """The last `max_messages` messages, keeping a leading system message, each cut in the
    middle to `max_chars` characters: what the server accepts. The roles drop the oldest
    turns first and clip the rest to fit their window anyway (actors/prompts fit_to_budget)."""
    messages = [{"role": m["role"], "content": clip_middle(m["content"], max_chars)} for m in messages]
    if len(messages) <= max_messages:
        return messages
    if messages[0]["role"] == "system":
        return messages[:1] + messages[len(messages) - max_messages + 1:]
    return messages[-max_messages:]


class ServedRewriter:
    """`Rewriter.rewrite_batch` through POST /v1/rewrite."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.client = endpoint.client()
        self.pool = ThreadPoolExecutor(endpoint.concurrency, thread_name_prefix="rewrite")

    def rewrite_batch(self, personas: Sequence[str | None], contexts: Sequence[Sequence[Any]],
                      answers: Sequence[str], messages: Sequence[str | None]) -> list[Rewrite]:
        """One Rewrite per answer, in order. A None message (rewrites_from_scratch) cannot
        be served: the endpoint requires the feedback."""
        if any(m is None for m in messages):
            raise ValueError("the served rewriter needs the follow-up of every answer; "
                             "ablation.rewrites_from_scratch needs rewrites.rewriter_via: pool")
        items = list(zip(personas, contexts, answers, messages, strict=True))
        return list(self.pool.map(lambda item: self._rewrite(*item), items))

    def _rewrite(self, persona: str | None, context: Sequence[Any], answer: str,
                 message: str) -> Rewrite:
        if not answer.strip():
            return Rewrite("", EMPTY_ANSWER, 0)
        limit = self.endpoint.max_chars
        out = self.client.rewrite(persona or "", fit_messages(context, self.endpoint.max_messages, limit),
                                  clip_middle(answer, limit), clip_middle(message, limit))
        return Rewrite(out["rewrite"], out["finish_reason"], out["context_truncated"])


class ServedRewardModel:
    """`RewardModel.score_batch` through POST /v1/score (the server's backend and model)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.client = endpoint.client()
        self.pool = ThreadPoolExecutor(endpoint.concurrency, thread_name_prefix="score")

    def score_batch(self, personas: Sequence[str | None], contexts: Sequence[Sequence[Any]],
                    candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        """Scores per conversation, in order. An empty candidate cannot be sent (the API
        refuses it) and scores NaN, so its prompt is filtered `invalid_scores`."""
        items = list(zip(personas, contexts, candidates, strict=True))
        return list(self.pool.map(lambda item: self._score(*item), items))

    def _score(self, persona: str | None, context: Sequence[Any],
               candidates: Sequence[str]) -> list[float]:
        sent = [i for i, c in enumerate(candidates) if c]
        scores = [float("nan")] * len(candidates)
        if sent:
            limit = self.endpoint.max_chars
            got = self.client.score(persona or "", fit_messages(context, self.endpoint.max_messages, limit),
                                    [clip_middle(candidates[i], limit) for i in sent])
            for i, score in zip(sent, got, strict=True):
                scores[i] = float(score)
        return scores
