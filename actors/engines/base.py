"""The generation and scoring interface every engine implements, and what it returns.

Roles talk to this interface only, so a role runs unchanged on transformers (CPU tests, a
GPU), vLLM (GPU serving scale) or an OpenAI-compatible server (a hosted judge). Prompts are
always chat messages; each engine applies the model's chat template itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence, TypedDict, runtime_checkable


class PromptRejected(RuntimeError):
    """The engine's server refused one prompt's content (HTTP 400, 413 or 422: too long,
    malformed); the other prompts of a batch are unaffected."""


class Message(TypedDict):
    """One chat message, as in TRL's conversational format."""

    role: str
    content: str


@dataclass(frozen=True)
class SamplingParams:
    """How to decode. Same meaning in every engine (OpenAI/vLLM semantics)."""

    max_new_tokens: int = 256
    temperature: float = 0.0          # 0: greedy
    top_p: float = 1.0
    n: int = 1                        # completions per prompt
    stop: tuple[str, ...] = ()        # cut before the first of these; not included
    seed: int | None = 0              # None: not reproducible


@dataclass(frozen=True)
class Completion:
    """One generated answer."""

    text: str
    num_tokens: int                   # generated tokens, stop/EOS included
    finish_reason: str                # "stop" (EOS or a stop string) or "length"


@runtime_checkable
class GenerationEngine(Protocol):
    """Chat generation plus log-likelihood scoring of given continuations."""

    max_context_tokens: int
    """Prompt plus completion tokens the model can take."""

    def generate(self, prompts: Sequence[Sequence[Message]],
                 params: SamplingParams) -> list[list[Completion]]:
        """`params.n` completions for each prompt, in prompt order."""
        ...

    def score_continuations(self, prompts: Sequence[Sequence[Message]],
                            continuations: Sequence[Sequence[str]]) -> list[list[float]]:
        """Summed log-probability of each continuation as the assistant's reply to its prompt.

        The label-likelihood primitive: classification compares the scores of the label
        names; a yes/no judge reads P("Yes"). Small models do this far more reliably than
        they write parseable JSON.
        """
        ...

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Tokens of `messages` rendered as a prompt (chat template and generation cue)."""
        ...


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` up to (not including) the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def normalize(logprobs: Sequence[float]) -> list[float]:
    """Softmax over candidate log-probabilities: P(candidate | one of the candidates)."""
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    return [w / total for w in weights]


def as_messages(messages: Sequence[object]) -> list[Message]:
    """Plain {role, content} dicts from dicts or Arrow/numpy rows with extra fields."""
    return [Message(role=str(m["role"]), content=str(m["content"] or ""))  # type: ignore[index]
            for m in messages]
