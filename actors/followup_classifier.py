"""FollowupClassifier: what does the user's reply say about the answer before it?

Labels (DESIGN.md, after Don-Yehiya et al. 2024 and the paper's "re-attempt with
feedback"): reattempt_feedback, correction, complaint carry feedback and feed rewrites;
clarification, positive, new_request do not.

Backends:
- `rules` (actors/followup_rules.py): no model, for scale.
- `llm` classifies by label likelihood: the summed log-probability of each label name as
  the model's reply to `actors/prompts/followup.jinja`, normalised over the labels. The
  label is the most likely one and the confidence its probability. A prompt that cannot be
  built is recorded as unclassified with the reason, never guessed.
- `learned` (actors/followup_learned.py): a logistic regression over sentence embeddings
  and the rules' reading, trained on the development labels.
- `cascade`: `rules` as a recall-oriented prefilter; follow-ups it labels anything but a
  confident `new_request` go to `cascade_model` (`llm` or `learned`), the rest keep the
  rules' label. At WildChat scale most follow-ups are new requests, so the model sees a
  small share of them.

Ray Data columns: `context`, `answer`, `message` in; `label`, `confidence`, `backend`,
`unclassified_reason` out. Serve: `classify()` / `classify_batch()`.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from actors.batch import Batch, map_batch
from actors.engines import GenerationEngine, make_engine, normalize
from actors.engines.base import PromptRejected, as_messages
from actors.followup_labels import FOLLOWUP_LABELS
from actors.followup_rules import RulesClassifier
from actors.models import SMOLLM2, ModelSpec, as_spec
from actors.prompts import fit_to_budget, render

Backend = Literal["rules", "llm", "learned", "cascade"]
# A rules `new_request` at or above this confidence skips the model in `cascade`; the
# rules give 0.8 to long messages with no feedback cue at all, 0.6 to short ambiguous ones.
CASCADE_SKIP_CONFIDENCE = 0.8


def previous_user(context: Sequence[Any]) -> str | None:
    """The user's request the answer responded to: the last user turn of the context."""
    for turn in reversed(as_messages(context)):
        if turn["role"] == "user":
            return turn["content"]
    return None


@dataclass(frozen=True)
class FollowupLabel:
    """One classification. `label` is None when unclassified, with the reason."""

    label: str | None
    confidence: float
    backend: str
    unclassified_reason: str | None = None


def asks_model(rules_result: FollowupLabel) -> bool:
    """Whether `cascade` sends a follow-up the rules labelled to its model: anything but a
    confident new request."""
    return rules_result.label != "new_request" or rules_result.confidence < CASCADE_SKIP_CONFIDENCE


class FollowupClassifier:
    """context, assistant answer, user follow-up -> label with confidence."""

    INPUTS = ("context", "answer", "message")
    OUTPUTS = ("label", "confidence", "backend", "unclassified_reason")

    def __init__(self, backend: Backend = "llm", model: ModelSpec | dict | str = SMOLLM2, *,
                 engine: GenerationEngine | None = None, labels: Sequence[str] = FOLLOWUP_LABELS,
                 cascade_model: Literal["llm", "learned"] = "llm", learned_model: str | None = None) -> None:
        if backend not in ("rules", "llm", "learned", "cascade"):
            raise ValueError(f"unknown follow-up backend {backend!r}; expected rules, llm, learned "
                             "or cascade")
        self.backend = backend
        self.labels = tuple(labels)
        self.rules = RulesClassifier()
        self.model_kind = cascade_model if backend == "cascade" else backend
        if backend == "rules":
            return
        if self.model_kind == "learned":
            from actors.followup_learned import ARTIFACT, LearnedFollowupModel

            self.learned = LearnedFollowupModel(learned_model or ARTIFACT)
            return
        system = render("followup", None, [], answer="", message="")[0]["content"]
        undescribed = [lab for lab in self.labels if f"- {lab}:" not in system]
        if undescribed:
            raise ValueError(f"labels {undescribed} are not described in "
                             "actors/prompts/followup.jinja; the model cannot choose them")
        self.spec = as_spec(model)
        self.engine = engine or make_engine(self.spec)
        self._label_tokens = max(self.engine.count_tokens(
            [{"role": "assistant", "content": lab}]) for lab in self.labels)

    def classify(self, context: Sequence[Any], answer: str, message: str) -> FollowupLabel:
        """Label one follow-up."""
        return self.classify_batch([context], [answer], [message])[0]

    def label_probabilities(self, context: Sequence[Any], answer: str,
                            message: str) -> dict[str, float]:
        """P(label) for every label: the label-likelihood core, for inspection."""
        prompt = self._prompt(context, answer, message)
        scores = self.engine.score_continuations([prompt.messages], [self.labels])[0]
        return dict(zip(self.labels, normalize(scores)))

    def classify_batch(self, contexts: Sequence[Sequence[Any]], answers: Sequence[str],
                       messages: Sequence[str]) -> list[FollowupLabel]:
        """Label many follow-ups (one scoring call for the model's share)."""
        if self.backend in ("llm", "learned"):
            return self._model_batch(contexts, answers, messages)
        items = [(previous_user(c), a, m) for c, a, m in zip(contexts, answers, messages, strict=True)]
        results = [FollowupLabel(label, confidence, "rules") for label, confidence in self.rules.classify(items)]
        if self.backend == "rules":
            return results
        ask = [i for i, r in enumerate(results) if asks_model(r)]
        if ask:
            asked = self._model_batch([contexts[i] for i in ask], [answers[i] for i in ask],
                                      [messages[i] for i in ask])
            for i, result in zip(ask, asked):
                results[i] = result
        return [FollowupLabel(r.label, r.confidence, "cascade", r.unclassified_reason) for r in results]

    def _model_batch(self, contexts: Sequence[Sequence[Any]], answers: Sequence[str],
                     messages: Sequence[str]) -> list[FollowupLabel]:
        if self.model_kind == "learned":
            items = [(previous_user(c), a, m) for c, a, m in zip(contexts, answers, messages, strict=True)]
            return [FollowupLabel(label, confidence, "learned") for label, confidence in self.learned.classify(items)]
        return self._llm_batch(contexts, answers, messages)

    def _llm_batch(self, contexts: Sequence[Sequence[Any]], answers: Sequence[str],
                   messages: Sequence[str]) -> list[FollowupLabel]:
        results: list[FollowupLabel | None] = []
        prompts = []
        for ctx, answer, message in zip(contexts, answers, messages, strict=True):
            try:
                prompts.append(self._prompt(ctx, answer, message).messages)
                results.append(None)
            except ValueError as err:
                results.append(FollowupLabel(None, 0.0, self.backend, f"prompt: {err}"))
        scores = iter(self._scores(prompts))
        for i, result in enumerate(results):
            if result is None:
                label_scores = next(scores)
                if isinstance(label_scores, PromptRejected):   # the server refused this prompt alone
                    results[i] = FollowupLabel(None, 0.0, self.backend, f"engine: {label_scores}")
                    continue
                label_scores = list(label_scores)
                if len(label_scores) != len(self.labels) or not all(map(math.isfinite, label_scores)):
                    # A broken score is no evidence for any label: record it, never guess.
                    results[i] = FollowupLabel(None, 0.0, "llm", f"scores: unusable {label_scores!r}")
                    continue
                probs = normalize(label_scores)
                best = max(range(len(probs)), key=probs.__getitem__)
                results[i] = FollowupLabel(self.labels[best], probs[best], "llm")
        return results  # type: ignore[return-value]

    def _scores(self, prompts: list) -> list:
        """Label scores per prompt; a prompt the engine's server refuses (PromptRejected) gets
        its error in place of scores, the rest are scored; any other failure is raised."""
        if not prompts:
            return []
        try:
            return self.engine.score_continuations(prompts, [self.labels] * len(prompts))
        except PromptRejected:
            def one(prompt: list) -> Any:
                try:
                    return self.engine.score_continuations([prompt], [self.labels])[0]
                except PromptRejected as err:
                    return err

            with ThreadPoolExecutor(max_workers=min(8, len(prompts))) as pool:   # an HTTP engine's requests
                return list(pool.map(one, prompts))

    def _prompt(self, context: Sequence[Any], answer: str, message: str):
        return fit_to_budget("followup", None, context, answer=answer, message=message,
                             count_tokens=self.engine.count_tokens,
                             max_tokens=self.engine.max_context_tokens,
                             reserve_tokens=self._label_tokens)

    def __call__(self, batch: Batch) -> Batch:
        def run(context: list, answer: list, message: list) -> dict[str, list]:
            out = self.classify_batch(context, answer, message)
            return {"label": [r.label for r in out],
                    "confidence": [r.confidence for r in out],
                    "backend": [r.backend for r in out],
                    "unclassified_reason": [r.unclassified_reason for r in out]}

        return map_batch(batch, self.INPUTS, run)
