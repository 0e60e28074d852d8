"""The `learned` follow-up backend: a logistic regression over the rules backend's reading of
a follow-up and how it relates to the request and the answer, with sentence embeddings.

Features (FEATURES_VERSION 2), one row per follow-up:
- the rules' label (one-hot), the rule that decided (one-hot over `RULE_NAMES`) and its
  confidence: what the rules see, so the model learns which of their readings to trust;
- word overlap between the follow-up and the request before it (share of the request kept,
  share of the follow-up that is the request's, Jaccard, new words, no request at all): a
  re-ask keeps its request;
- cosine similarities of the follow-up, the request and the answer under the embedded
  all-MiniLM-L6-v2 encoder (mean-pooled, unit-normalised, `MAX_TOKENS` tokens each): a
  re-ask in other words keeps the request's meaning;
- lengths (log characters of follow-up, request, answer), a question mark near the start,
  whether the answer declined or holds code.
The raw 384-dimensional embeddings are not features: on the development labels, grouped
5-fold cross-validation scored them below the rules alone (feedback F1 0.48-0.60 against
0.64), too many dimensions for about a thousand examples.

The model is trained on the development labels only (pipelines/tools/train_followups.py)
and saved as a versioned artifact: `weights.safetensors` (coefficients, intercepts,
feature scaling) and `meta.json` (labels, version, the hash of the training data,
cross-validated scores). Loading reads safetensors only; nothing is unpickled.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from actors.followup_labels import FEEDBACK_LABELS, FOLLOWUP_LABELS
from actors.followup_rules import RULE_NAMES, content_tokens, explain_followup, has_code, refused
from actors.model_cache import MINILM, REPO

ARTIFACT = REPO / "data" / "models" / "followup-learned"
FEATURES_VERSION = 2
MAX_TOKENS = 64
BATCH = 64

Item = tuple  # (previous_user or None, answer, message), as RulesClassifier takes them


class SentenceEncoder:
    """Mean-pooled, unit-normalised sentence embeddings from a transformers encoder."""

    def __init__(self, model_id: str = MINILM, max_tokens: int = MAX_TOKENS) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        from actors.models import resolve_model

        path = resolve_model(model_id)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        self.model = AutoModel.from_pretrained(path, trust_remote_code=False, use_safetensors=True).eval()
        self.max_tokens, self.torch = max_tokens, torch

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """One row per text, in the order given. Texts are batched by token length, so a
        batch pads to its own longest text instead of the 64-token cap: the encoder's cost is
        its tokens (about 21 MFLOP each), and follow-ups and requests are mostly short."""
        ids = self.tokenizer([t or "" for t in texts], truncation=True, max_length=self.max_tokens)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        for start in range(0, len(order), BATCH):
            chunk = order[start:start + BATCH]
            batch = self.tokenizer.pad({"input_ids": [ids[i] for i in chunk]}, return_tensors="pt")
            with self.torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out[chunk] = self.torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return out


def _overlap(previous_user: str | None, message: str) -> list[float]:
    """Kept share of the request, the follow-up's share that is the request's, Jaccard, log
    new words, and 1 when there is no request."""
    if not previous_user:
        return [0.0, 0.0, 0.0, 0.0, 1.0]
    request, follow = content_tokens(previous_user), content_tokens(message)
    if not request or not follow:
        return [0.0, 0.0, 0.0, 0.0, 0.0]
    shared = len(request & follow)
    return [shared / len(request), shared / len(follow), shared / len(request | follow),
            math.log1p(len(follow - request)), 0.0]


def features(items: Sequence[Item], encoder: SentenceEncoder) -> np.ndarray:
    """One row per follow-up (FEATURES_VERSION 2; see the module docstring)."""
    previous = encoder.encode([p or "" for p, _, _ in items])
    answers = encoder.encode([a[:1000] for _, a, _ in items])
    messages = encoder.encode([m[:1000] for _, _, m in items])
    rows = []
    for (p, a, m), prev_vec, ans_vec, msg_vec in zip(items, previous, answers, messages):
        label, confidence, rule = explain_followup(p, a, m)
        rows.append([label == name for name in FOLLOWUP_LABELS] + [rule == name for name in RULE_NAMES]
                    + [confidence] + _overlap(p, m)
                    + [float(msg_vec @ prev_vec), float(msg_vec @ ans_vec), float(prev_vec @ ans_vec)]
                    + [math.log1p(len(m)), math.log1p(len(p or "")), math.log1p(len(a)), "?" in m[:300],
                       refused(a), has_code(a)])
    return np.asarray(rows, dtype=np.float32).reshape(len(items), -1)


class LearnedFollowupModel:
    """The saved logistic regression: P(label) for follow-ups."""

    def __init__(self, folder: Path | str = ARTIFACT, encoder: SentenceEncoder | None = None) -> None:
        from safetensors.numpy import load_file

        folder = Path(folder)
        if not (folder / "meta.json").is_file():
            raise FileNotFoundError(f"{folder} holds no learned follow-up model (meta.json): train one with "
                                    "`rlhi train-followups` or point followups.learned_model at one")
        self.meta = json.loads((folder / "meta.json").read_text())
        if self.meta["features_version"] != FEATURES_VERSION:
            raise ValueError(f"{folder}: features version {self.meta['features_version']}, this code reads "
                             f"{FEATURES_VERSION}; retrain with `rlhi train-followups`")
        weights = load_file(str(folder / "weights.safetensors"))
        self.coef, self.intercept = weights["coef"], weights["intercept"]
        self.feedback_coef, self.feedback_intercept = weights["feedback_coef"], weights["feedback_intercept"]
        self.mean, self.scale = weights["mean"], weights["scale"]
        self.labels = tuple(self.meta["labels"])
        self.feedback_threshold = float(self.meta["feedback_threshold"])
        self.encoder = encoder or SentenceEncoder(self.meta["encoder"], self.meta["max_tokens"])

    def classify(self, items: Sequence[Item]) -> list[tuple[str, float]]:
        """(label, confidence) per follow-up. The binary head decides whether it carries
        feedback (probability at or above the trained threshold); the label is then the
        multinomial head's likeliest within that group, with its probability."""
        if not items:
            return []
        x = (features(items, self.encoder) - self.mean) / self.scale
        carries = 1 / (1 + np.exp(-(x @ self.feedback_coef + self.feedback_intercept)))
        logits = x @ self.coef.T + self.intercept
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        feedback = [i for i, lab in enumerate(self.labels) if lab in FEEDBACK_LABELS]
        other = [i for i in range(len(self.labels)) if i not in feedback]
        out = []
        for row, pf in zip(p, carries):
            pool = feedback if pf >= self.feedback_threshold else other
            best = max(pool, key=lambda i: row[i])
            out.append((self.labels[best], float(row[best] / row[pool].sum())))
        return out
