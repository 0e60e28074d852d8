"""RewardModel: how well does each candidate answer serve this user? Higher is better.

The second half of user-based rewards (DESIGN.md, source 2): the reward model sees the
persona, as the paper's user-based reward does, and scores the PolicySampler's candidates.

Backends:
- `judge` (default): any instruct model through the generation engines; the score is
  P("Yes") of a yes/no verdict on `actors/prompts/reward_judge.jinja`, in [0, 1].
- `classifier`: a sequence-classification reward model (Skywork-Reward style) reading
  the policy prompt (base system prompt + persona block + context) plus the candidate
  through its chat template. Unbounded logits.
- `trained`: this project's Bradley-Terry reward model, an encoder (all-MiniLM-L6-v2 by
  default) with a one-output head, trained by the reward_model stage and loaded from its
  folder. It reads the text pair (`encoder_prompt_text`, candidate). Unbounded logits.
Scales differ between backends, so pair building thresholds per prompt, not absolutely.

Ray Data columns: `persona`, `context`, `candidates` in; `scores` out.
Serve: `score(persona, messages, candidates) -> list[float]`, `score_batch()`; with the
`classifier` and `trained` backends also `encode()` (prompt fitting and tokenization, per
request) and `score_encoded()` (the model call), so a server batches only the model call.
"""
from __future__ import annotations

from typing import Any, Literal, Sequence

from actors.batch import Batch, map_batch, regroup
from actors.engines import GenerationEngine, make_engine, normalize
from actors.engines.base import Message
from actors.engines.reward_scorer import Row, SequenceRewardScorer
from actors.models import MINILM, SMOLLM2, ModelSpec, as_spec, pick_device
from actors.prompts import fit_to_budget

Backend = Literal["judge", "classifier", "trained"]
YES_NO = ("Yes", "No")


class RewardModel:
    """persona, conversation, candidates -> one score per candidate."""

    INPUTS = ("persona", "context", "candidates")
    OUTPUTS = ("scores",)

    def __init__(self, backend: Backend = "judge", model: ModelSpec | dict | str | None = None,
                 *, engine: GenerationEngine | None = None,
                 scorer: SequenceRewardScorer | None = None) -> None:
        if backend not in ("judge", "classifier", "trained"):
            raise ValueError(f"unknown reward backend {backend!r}; expected judge, "
                             "classifier or trained")
        if model is None and backend != "judge":
            raise ValueError(f"reward backend {backend!r} needs a model: a reward-model Hub id "
                             "or folder ('classifier'), or the folder the reward_model stage "
                             "saved ('trained')")
        self.backend = backend
        self.spec = as_spec(model or SMOLLM2)
        if backend == "judge":
            self.engine = engine or make_engine(self.spec)
        else:
            self.scorer = scorer or SequenceRewardScorer(self.spec)
            if backend == "classifier" and not self.scorer.reads_chats:
                raise ValueError(f"reward model {self.spec.id!r} has no chat template; the "
                                 "'classifier' backend needs a chat reward model (an encoder "
                                 "reward model is backend 'trained')")

    def score(self, persona: str | None, messages: Sequence[Any],
              candidates: Sequence[str]) -> list[float]:
        """Scores of `candidates` as replies to `messages` (ending with a user turn)."""
        return self.score_batch([persona], [messages], [candidates])[0]

    def score_batch(self, personas: Sequence[str | None], contexts: Sequence[Sequence[Any]],
                    candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        """Scores for many conversations, flattened into one model call."""
        flat = [(p, c, cand) for p, c, cands in zip(personas, contexts, candidates, strict=True)
                for cand in cands]
        if self.backend == "judge":
            scores = self._judge(flat)
        else:
            scores = self.scorer.score_encoded(self._encode(flat))
        return regroup(scores, candidates)

    @property
    def encodes(self) -> bool:
        """True when `encode` / `score_encoded` apply (the sequence-classifier backends)."""
        return self.backend != "judge"

    def encode(self, persona: str | None, messages: Sequence[Any],
               candidates: Sequence[str]) -> list[Row]:
        """Token rows of one request's candidates, exactly as `score_batch` builds them."""
        return self._encode([(persona, messages, c) for c in candidates])

    def score_encoded(self, rows: Sequence[Row]) -> list[float]:
        """Scores of token rows from `encode` (any number of requests', in order)."""
        return self.scorer.score_encoded(rows)

    # ------------------------------------------------------------------ backends

    def _encode(self, rows: list[tuple[Any, Any, str]]) -> list[Row]:
        if self.backend == "classifier":
            return self.scorer.encode_chats(self._classifier_chats(rows))
        texts = [encoder_prompt_text(persona, context, candidate, self.scorer)
                 for persona, context, candidate in rows]
        return self.scorer.encode_text_pairs(texts, [candidate for _, _, candidate in rows])

    def judge_prompts(self, persona: str | None, messages: Sequence[Any],
                      candidates: Sequence[str]) -> list[list[Message]]:
        """The judge backend's prompt per candidate of one request, as `score_batch` builds
        them (a persona that cannot fit raises PromptTooLong for this request alone)."""
        return [fit_to_budget("reward_judge", persona, messages, candidate=candidate,
                              count_tokens=self.engine.count_tokens,
                              max_tokens=self.engine.max_context_tokens, reserve_tokens=2).messages
                for candidate in candidates]

    def score_judge_prompts(self, prompts: Sequence[list[Message]]) -> list[float]:
        """Scores of judge prompts from `judge_prompts` (any number of requests', in order)."""
        scores = self.engine.score_continuations(list(prompts), [YES_NO] * len(prompts))
        return [normalize(s)[0] for s in scores]

    def _judge(self, rows: list[tuple[Any, Any, str]]) -> list[float]:
        return self.score_judge_prompts([prompt for persona, context, candidate in rows
                                         for prompt in self.judge_prompts(persona, context, [candidate])])

    def _classifier_chats(self, rows: list[tuple[Any, Any, str]]) -> list[list[Message]]:
        chats = []
        for persona, context, candidate in rows:
            answer = Message(role="assistant", content=candidate)
            prompt = fit_to_budget(
                "policy", persona, context, max_tokens=self.scorer.max_context_tokens,
                count_tokens=lambda ms: self.scorer.count_chat_tokens([*ms, answer]),
                reserve_tokens=0)
            chats.append([*prompt.messages, answer])
        return chats

    def __call__(self, batch: Batch) -> Batch:
        return map_batch(batch, self.INPUTS, lambda persona, context, candidates: {
            "scores": self.score_batch(persona, context, candidates)})


# ---------------------------------------------------------------- the trained backend

def flatten_chat(messages: Sequence[Message]) -> str:
    """A chat as plain text for an encoder: one `role: content` block per message."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def encoder_prompt_text(persona: str | None, context: Sequence[Any], candidate: str,
                        scorer: SequenceRewardScorer) -> str:
    """The first text of the `trained` model's (prompt, answer) pair, within its budget.

    The same budget rule as every stage, with the answer's share capped at half the
    encoder's window (512 tokens for MiniLM): training (the reward_model stage) and scoring
    must both use this function so the model sees the same format.
    """
    answer_tokens = scorer.count_text_tokens(candidate)
    limit = scorer.max_context_tokens
    prompt = fit_to_budget("policy", persona, context,
                           count_tokens=lambda ms: scorer.count_text_tokens(flatten_chat(ms)),
                           max_tokens=limit, reserve_tokens=min(answer_tokens, limit // 2) + 4)
    return flatten_chat(prompt.messages)


def init_trained_reward_model(encoder: ModelSpec | str = MINILM) -> tuple[Any, Any]:
    """A fresh Bradley-Terry reward model: `encoder` plus a new one-output head.

    The one place where a newly initialised head is intended (the reward_model stage's
    training starts here); every loader elsewhere refuses missing weights. Save the trained result
    with `save_pretrained` and load it as `RewardModel("trained", folder)`.
    """
    from transformers import AutoModelForSequenceClassification

    from actors.models import load_tokenizer, resolve_model

    spec = as_spec(encoder)
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model(spec.id), num_labels=1, trust_remote_code=False, use_safetensors=True)
    return model.to(pick_device(spec)), load_tokenizer(spec)
