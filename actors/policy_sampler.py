"""PolicySampler: N candidate answers from the policy, with the user's persona in context.

The first half of user-based rewards (DESIGN.md, source 2): candidates are sampled at
T=0.6, top-p 0.9 as in the paper (Jin et al. 2025, sec. 3) and scored by the RewardModel.
The prompt it returns is the exact DPO prompt: base system prompt + persona block + context.

Ray Data: `ds.map_batches(PolicySampler, fn_constructor_kwargs={"model": spec.model_dump(),
"n": 4}, compute=ActorPoolStrategy(size=...))`, columns `persona`, `context` in;
`prompt`, `candidates`, `context_truncated` out. Serve: `sample()` / `sample_batch()`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from actors.batch import Batch, map_batch
from actors.engines import GenerationEngine, Message, SamplingParams, make_engine
from actors.models import SMOLLM2, ModelSpec, as_spec
from actors.prompts import fit_to_budget

PAPER_TEMPERATURE, PAPER_TOP_P = 0.6, 0.9


@dataclass(frozen=True)
class Samples:
    """The prompt sampled from and its candidates."""

    prompt: list[Message]
    candidates: list[str]
    context_truncated: int
    truncated: list[bool] | None = None
    """Per candidate: cut at max_new_tokens (finish reason "length")."""


class PolicySampler:
    """persona, context (ending with the user turn) -> `n` candidate answers."""

    INPUTS = ("persona", "context")
    OUTPUTS = ("prompt", "candidates", "context_truncated")

    def __init__(self, model: ModelSpec | dict | str = SMOLLM2, n: int = 4, *,
                 engine: GenerationEngine | None = None) -> None:
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        self.spec = as_spec(model)
        self.n = n
        self.engine = engine or make_engine(self.spec)
        self.params = SamplingParams(
            max_new_tokens=self.spec.max_new_tokens, n=n, seed=self.spec.seed,
            temperature=PAPER_TEMPERATURE if self.spec.temperature is None
            else self.spec.temperature,
            top_p=PAPER_TOP_P if self.spec.top_p is None else self.spec.top_p)

    def sample(self, persona: str | None, context: Sequence[Any]) -> Samples:
        """`n` candidates for one conversation."""
        return self.sample_batch([persona], [context])[0]

    def sample_batch(self, personas: Sequence[str | None],
                     contexts: Sequence[Sequence[Any]]) -> list[Samples]:
        """`n` candidates for each conversation, generated in one engine call."""
        prompts = [self.prompt(p, c) for p, c in zip(personas, contexts, strict=True)]
        outputs = self.engine.generate([p.messages for p in prompts], self.params)
        return [Samples(p.messages, [c.text for c in out], p.context_truncated,
                        [c.finish_reason == "length" for c in out])
                for p, out in zip(prompts, outputs)]

    def prompt(self, persona: str | None, context: Sequence[Any], reserve_tokens: int | None = None):
        """The budgeted policy prompt (also the DPO prompt of the pair built from it), with
        room for `reserve_tokens` new tokens (default: this sampler's max_new_tokens)."""
        if not context or context[-1]["role"] != "user":
            raise ValueError("the policy answers a user turn: context must end with one")
        return fit_to_budget("policy", persona, context,
                             count_tokens=self.engine.count_tokens,
                             max_tokens=self.engine.max_context_tokens,
                             reserve_tokens=self.params.max_new_tokens if reserve_tokens is None else reserve_tokens)

    def __call__(self, batch: Batch) -> Batch:
        def run(persona: list, context: list) -> dict[str, list]:
            out = self.sample_batch(persona, context)
            return {"prompt": [s.prompt for s in out],
                    "candidates": [s.candidates for s in out],
                    "context_truncated": [s.context_truncated for s in out]}

        return map_batch(batch, self.INPUTS, run)
