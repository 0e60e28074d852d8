"""Rewriter: revise an assistant answer using the user's follow-up (user-guided rewrites).

DESIGN.md source 1: when the user's next message says the answer fell short, the rewrite
becomes the chosen answer and the original the rejected one. The rewriter sees the
persona, the conversation before the answer, the answer and the follow-up, laid out as the
spec's `rewrite_prompt` says: `quoted` as data in one user message
(`actors/prompts/rewriter.jinja`), `chat` as the chat's own turns (`rewriter_chat.jinja`).
A follow-up of None leaves the follow-up out (the rewrites_from_scratch ablation: the
rewriter improves the answer from the persona alone; in the chat layout the last user turn
is then `FROM_SCRATCH_REQUEST`). Decoding is greedy unless the spec sets a temperature, so
a rerun rewrites the same way.

Ray Data columns: `persona`, `context`, `answer`, `message` in; `rewrite`,
`finish_reason`, `context_truncated` out. Serve: `rewrite()` / `rewrite_batch()`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from actors.batch import Batch, map_batch
from actors.engines import GenerationEngine, SamplingParams, make_engine
from actors.models import SMOLLM2, ModelSpec, as_spec
from actors.prompts import Prompt, fit_to_budget


@dataclass(frozen=True)
class Rewrite:
    """A revised answer. `finish_reason` "length" means it hit max_new_tokens."""

    text: str
    finish_reason: str
    context_truncated: int


# Small models continue the prompt's layout after the answer ("The user replied: ...");
# these markers never begin a real answer, so generation stops there.
STOP = ("<answer>", "</answer>", "<user_message>", "</user_message>", "<conversation>",
        "The assistant answered:", "The user replied:")
# The chat layout's last user turn when the rewriter is not shown the follow-up.
FROM_SCRATCH_REQUEST = "Please write a better version of your answer for me."


def rewrite_messages(style: str, persona: str | None, context: Sequence[Any], answer: str,
                     message: str | None) -> tuple[str, list[Any], dict[str, Any]]:
    """(prompt role, context, template fields) of one rewrite in layout `style`, for
    `actors.prompts.render` / `fit_to_budget`."""
    if style == "chat":
        turns = [*context, {"role": "assistant", "content": answer},
                 {"role": "user", "content": FROM_SCRATCH_REQUEST if message is None else message}]
        return "rewriter_chat", turns, {"message": message}
    return "rewriter", list(context), {"answer": answer, "message": message}


class Rewriter:
    """persona, context, answer, follow-up -> revised answer."""

    INPUTS = ("persona", "context", "answer", "message")
    OUTPUTS = ("rewrite", "finish_reason", "context_truncated")

    def __init__(self, model: ModelSpec | dict | str = SMOLLM2, *,
                 engine: GenerationEngine | None = None) -> None:
        self.spec = as_spec(model)
        self.engine = engine or make_engine(self.spec)
        self.params = SamplingParams(max_new_tokens=self.spec.max_new_tokens,
                                     temperature=self.spec.temperature or 0.0,
                                     top_p=self.spec.top_p or 1.0, seed=self.spec.seed,
                                     stop=STOP)

    def rewrite(self, persona: str | None, context: Sequence[Any], answer: str,
                message: str | None) -> Rewrite:
        """Revise one answer."""
        return self.rewrite_batch([persona], [context], [answer], [message])[0]

    def rewrite_batch(self, personas: Sequence[str | None], contexts: Sequence[Sequence[Any]],
                      answers: Sequence[str], messages: Sequence[str | None]) -> list[Rewrite]:
        """Revise many answers in one engine call (a None message: no follow-up shown)."""
        return self.generate([self.prompt(persona, context, answer, message) for persona, context, answer, message
                              in zip(personas, contexts, answers, messages, strict=True)])

    def prompt(self, persona: str | None, context: Sequence[Any], answer: str, message: str | None) -> Prompt:
        """The budgeted prompt of one rewrite (PromptTooLong when the persona and the request
        cannot fit the window)."""
        role, turns, fields = rewrite_messages(self.spec.rewrite_prompt, persona, context, answer, message)
        return fit_to_budget(role, persona, turns, count_tokens=self.engine.count_tokens,
                             max_tokens=self.engine.max_context_tokens,
                             reserve_tokens=self.params.max_new_tokens, **fields)

    def generate(self, prompts: Sequence[Prompt]) -> list[Rewrite]:
        """The rewrites of prompts from `prompt`, in one engine call."""
        outputs = self.engine.generate([p.messages for p in prompts], self.params)
        return [Rewrite(out[0].text.strip(), out[0].finish_reason, p.context_truncated)
                for p, out in zip(prompts, outputs)]

    def __call__(self, batch: Batch) -> Batch:
        def run(persona: list, context: list, answer: list, message: list) -> dict[str, list]:
            out = self.rewrite_batch(persona, context, answer, message)
            return {"rewrite": [r.text for r in out],
                    "finish_reason": [r.finish_reason for r in out],
                    "context_truncated": [r.context_truncated for r in out]}

        return map_batch(batch, self.INPUTS, run)
