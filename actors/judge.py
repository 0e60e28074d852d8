"""Judge: which of two answers better serves this user, with a short reason.

Evaluation (win rates) and pair quality checks ask it. LLM judges favour whichever answer
comes first or second; asking both orders and averaging cancels that position bias, and an
order-dependent verdict is reported as a tie instead of a win. The verdict is read by label
likelihood (P("A") vs P("B") as the reply to `actors/prompts/judge.jinja`); the reason is a
short greedy generation from the first order's prompt.

`criterion` narrows the question (evaluation asks personalization, instruction following
and overall quality separately): it completes "decide which of two candidate answers ...",
e.g. "better follows the instructions in the user's last message". None keeps the
template's general criterion.

Ray Data columns: `persona`, `context`, `answer_a`, `answer_b` in; `winner` ("a", "b" or
"tie"), `prob_a`, `reason` out. Serve: `compare()` / `compare_batch()`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from actors.batch import Batch, map_batch
from actors.engines import GenerationEngine, SamplingParams, make_engine, normalize
from actors.models import SMOLLM2, ModelSpec, as_spec
from actors.prompts import fit_to_budget

VERDICTS = ("A", "B")


@dataclass(frozen=True)
class Verdict:
    """`prob_a`: P(answer a is better), averaged over both orders."""

    winner: str          # "a", "b", or "tie" when the two orders disagree
    prob_a: float
    reason: str


class Judge:
    """persona, context, answer a, answer b -> verdict, asked in both orders."""

    INPUTS = ("persona", "context", "answer_a", "answer_b")
    OUTPUTS = ("winner", "prob_a", "reason")

    def __init__(self, model: ModelSpec | dict | str = SMOLLM2, *,
                 engine: GenerationEngine | None = None, reason_tokens: int = 48,
                 criterion: str | None = None) -> None:
        self.spec = as_spec(model)
        self.criterion = criterion
        self.engine = engine or make_engine(self.spec)
        self.reason_params = SamplingParams(max_new_tokens=reason_tokens, temperature=0.0,
                                            stop=("\n\n",)) if reason_tokens else None

    def compare(self, persona: str | None, context: Sequence[Any], answer_a: str,
                answer_b: str) -> Verdict:
        """Judge one pair."""
        return self.compare_batch([persona], [context], [answer_a], [answer_b])[0]

    def compare_batch(self, personas: Sequence[str | None], contexts: Sequence[Sequence[Any]],
                      answers_a: Sequence[str], answers_b: Sequence[str]) -> list[Verdict]:
        """Judge many pairs: 2 scoring prompts each, plus one reason generation."""
        rows = list(zip(personas, contexts, answers_a, answers_b, strict=True))
        forward = [self._prompt(p, c, a, b) for p, c, a, b in rows]
        swapped = [self._prompt(p, c, b, a) for p, c, a, b in rows]
        scores = self.engine.score_continuations(forward + swapped,
                                                 [VERDICTS] * (2 * len(rows)))
        reasons = [""] * len(rows)
        if self.reason_params and rows:
            outs = self.engine.generate(forward, self.reason_params)
            reasons = [out[0].text.strip() for out in outs]
        verdicts = []
        for i in range(len(rows)):
            a_first = normalize(scores[i])[0]                # a shown as "A"
            a_second = normalize(scores[len(rows) + i])[1]   # a shown as "B"
            winner = ("a" if a_first > 0.5 and a_second > 0.5 else
                      "b" if a_first < 0.5 and a_second < 0.5 else "tie")
            verdicts.append(Verdict(winner, (a_first + a_second) / 2, reasons[i]))
        return verdicts

    def _prompt(self, persona: str | None, context: Sequence[Any], answer_a: str,
                answer_b: str):
        reserve = self.reason_params.max_new_tokens if self.reason_params else 2
        criterion = {"criterion": self.criterion} if self.criterion else {}
        return fit_to_budget("judge", persona, context, answer_a=answer_a, answer_b=answer_b,
                             **criterion, count_tokens=self.engine.count_tokens,
                             max_tokens=self.engine.max_context_tokens,
                             reserve_tokens=reserve).messages

    def __call__(self, batch: Batch) -> Batch:
        def run(persona: list, context: list, answer_a: list, answer_b: list) -> dict:
            out = self.compare_batch(persona, context, answer_a, answer_b)
            return {"winner": [v.winner for v in out], "prob_a": [v.prob_a for v in out],
                    "reason": [v.reason for v in out]}

        return map_batch(batch, self.INPUTS, run)
