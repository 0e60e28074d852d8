"""PersonaBuilder: a short summary of one user's long-term history (interface only).

A persona (DESIGN.md) summarises interests, expertise, format and tone preferences and
recurring tasks, built only from conversations before the turn it is used for. Its
backends, `extractive` (deterministic) and `llm` (an instruct model through the engines),
arrive with issue 3/8; this file fixes the role's shape so stages and Serve can be wired
against it now.

Ray Data columns: `history` (a list of conversations, each a list of {role, content},
oldest first) in; `persona` out. Serve: `build()` / `build_batch()`.
"""
from __future__ import annotations

from typing import Any, Literal, Sequence

from actors.batch import Batch, map_batch
from actors.models import SMOLLM2, ModelSpec, as_spec

Backend = Literal["extractive", "llm"]


class PersonaBuilder:
    """history (earlier conversations, oldest first) -> persona text ("" for no history)."""

    INPUTS = ("history",)
    OUTPUTS = ("persona",)

    def __init__(self, backend: Backend = "extractive", model: ModelSpec | dict | str = SMOLLM2,
                 *, max_persona_tokens: int = 256) -> None:
        if backend not in ("extractive", "llm"):
            raise ValueError(f"unknown persona backend {backend!r}; expected extractive or llm")
        self.backend = backend
        self.spec = as_spec(model)
        self.max_persona_tokens = max_persona_tokens

    def build(self, history: Sequence[Sequence[Any]]) -> str:
        """The persona of one user from their earlier conversations."""
        return self.build_batch([history])[0]

    def build_batch(self, histories: Sequence[Sequence[Sequence[Any]]]) -> list[str]:
        """Personas of many users."""
        raise NotImplementedError(
            f"the {self.backend!r} persona backend arrives with issue 3/8 (follow-up "
            "classification and personas)")

    def __call__(self, batch: Batch) -> Batch:
        return map_batch(batch, self.INPUTS,
                         lambda history: {"persona": self.build_batch(history)})
