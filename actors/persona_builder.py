"""PersonaBuilder: a short summary of one user's long-term history.

A persona (DESIGN.md; Jin et al. 2025) summarises interests, expertise, format and tone
preferences and recurring tasks, built only from conversations before the turn it is used
for (pipelines/stages/personas.py decides which conversations those are). Backends:
- `extractive` (actors/persona_extractive.py): deterministic counts and patterns, at scale;
- `llm`: an instruct model summarises the user's own requests and feedback
  (`actors/prompts/persona.jinja`), greedy, bounded in tokens and characters.

A history is a list of earlier conversations, most recent first, each a dict with `turns`
([{role, content}]), `language` and `feedback` (the user's feedback follow-ups in it).

Ray Data columns: `history` in; `persona` out. Serve: `build()` / `build_batch()`.
"""
from __future__ import annotations

from typing import Any, Literal, Sequence

from actors.batch import Batch, map_batch
from actors.engines import GenerationEngine, SamplingParams, make_engine
from actors.models import SMOLLM2, ModelSpec, as_spec
from actors.persona_extractive import extractive_persona
from actors.prompts import fit_to_budget

Backend = Literal["extractive", "llm"]
History = Sequence[dict[str, Any]]


class PersonaBuilder:
    """history (earlier conversations, most recent first) -> persona text ("" for none)."""

    INPUTS = ("history",)
    OUTPUTS = ("persona",)

    def __init__(self, backend: Backend = "extractive", model: ModelSpec | dict | str = SMOLLM2,
                 *, engine: GenerationEngine | None = None, max_persona_tokens: int = 160,
                 max_persona_chars: int = 600) -> None:
        if backend not in ("extractive", "llm"):
            raise ValueError(f"unknown persona backend {backend!r}; expected extractive or llm")
        self.backend = backend
        self.max_persona_chars = max_persona_chars
        self.engine = None
        if backend == "llm":
            self.spec = as_spec(model)
            self.engine = engine or make_engine(self.spec)
            self.params = SamplingParams(max_new_tokens=max_persona_tokens, temperature=0.0,
                                         top_p=1.0, seed=self.spec.seed)

    def build(self, history: History) -> str:
        """The persona of one user from their earlier conversations."""
        return self.build_batch([history])[0]

    def build_batch(self, histories: Sequence[History]) -> list[str]:
        """Personas of many users; an empty history gives ""."""
        if self.backend == "extractive":
            return [extractive_persona(h, self.max_persona_chars) for h in histories]
        todo = [i for i, h in enumerate(histories) if h]
        prompts = [fit_to_budget("persona", None, _requests(histories[i]),
                                 count_tokens=self.engine.count_tokens,
                                 max_tokens=self.engine.max_context_tokens,
                                 reserve_tokens=self.params.max_new_tokens).messages for i in todo]
        outputs = self.engine.generate(prompts, self.params) if prompts else []
        personas = [""] * len(histories)
        for i, out in zip(todo, outputs):
            personas[i] = out[0].text.strip()[: self.max_persona_chars]
        return personas

    def __call__(self, batch: Batch) -> Batch:
        return map_batch(batch, self.INPUTS,
                         lambda history: {"persona": self.build_batch(history)})


def _requests(history: History) -> list[dict[str, str]]:
    """The user's own words, oldest first, as the conversation the summariser quotes:
    what they asked and the feedback they gave (answers are not about the user)."""
    turns = []
    for item in reversed(history):
        turns += [{"role": "user", "content": t["content"]} for t in item["turns"] if t["role"] == "user"]
        turns += [{"role": "user", "content": f"(feedback) {f}"} for f in item.get("feedback") or []]
    return turns
