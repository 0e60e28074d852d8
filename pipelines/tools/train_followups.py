"""Train the `learned` follow-up backend on development labels only (`rlhi train-followups`).

    rlhi train-followups [--out DIR] [--json]

Reads the development part of `data/wildchat-more/` (labels with `split: dev`) and the
bundled sample's labels (an older development set); the test part is never read. The
features are actors/followup_learned.py's; the model is scikit-learn's multinomial
LogisticRegression with balanced class weights, twice: a binary head for "carries feedback"
and a multinomial head for the label within each group. The regularisation and the
threshold on the binary head's probability are chosen by stratified 5-fold cross-validation grouped
by conversation (no conversation's follow-ups on both sides of a fold), repeated over
`CV_REPEATS` shuffles, maximising the mean "carries feedback" F1; the rules backend's F1
on the same examples is recorded beside it. The
artifact (weights.safetensors, meta.json with the training data's hash and the
cross-validated scores) goes to `--out` (default data/models/followup-learned/).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from actors.followup_labels import FEEDBACK_LABELS, FOLLOWUP_LABELS
from actors.followup_learned import ARTIFACT, FEATURES_VERSION, MAX_TOKENS, SentenceEncoder, features
from actors.followup_rules import RulesClassifier
from actors.model_cache import MINILM, REPO
from pipelines.tools.followup_eval import followup_examples, load_gold_labels, read_conversations

SOURCES = [(REPO / "data" / "wildchat-more" / "train-00000-of-00001.parquet",
            REPO / "data" / "wildchat-more" / "followup_labels.jsonl", "dev"),
           (REPO / "data" / "wildchat" / "train-00000-of-00001.parquet",
            REPO / "data" / "wildchat" / "followup_labels.jsonl", None)]
C_GRID = (0.01, 0.03, 0.1, 0.3)
THRESHOLDS = tuple(np.round(np.arange(0.2, 0.71, 0.05), 2))
FOLDS = 5
CV_REPEATS = 3


def development_data() -> tuple[list[tuple], list[str], list[str], str]:
    """(items, labels, conversation of each, sha256 of what was read)."""
    items, labels, groups, digest = [], [], [], hashlib.sha256()
    for conversations, label_file, split in SOURCES:
        gold = load_gold_labels(label_file, split)
        examples = {(e["conversation_hash"], e["message_index"]): e
                    for e in followup_examples(read_conversations(conversations))}
        for key, label in sorted(gold.items()):
            e = examples[key]
            items.append((e["previous_user"], e["answer"], e["message"]))
            labels.append(label)
            groups.append(key[0])
            digest.update(json.dumps([key, label, e["message"], e["answer"]]).encode())
    return items, labels, groups, digest.hexdigest()


def _fit(x: np.ndarray, y: np.ndarray, c: float):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, class_weight="balanced", max_iter=3000).fit(x, y)


def cross_validate(x: np.ndarray, feedback: np.ndarray, groups: list[str]) -> dict[str, Any]:
    """Out-of-fold P(carries feedback) of the binary head per C over `CV_REPEATS` shuffles;
    the (C, threshold) with the best mean feedback F1."""
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedGroupKFold

    best: dict[str, Any] = {"f1": -1.0}
    for c in C_GRID:
        scores = np.zeros(len(THRESHOLDS))
        for repeat in range(CV_REPEATS):
            oof = np.zeros(len(y))
            folds = StratifiedGroupKFold(n_splits=FOLDS, shuffle=True, random_state=repeat)
            for train, held in folds.split(x, feedback, groups):
                oof[held] = _fit(x[train], feedback[train], c).predict_proba(x[held])[:, 1]
            scores += [f1_score(feedback, oof >= t) for t in THRESHOLDS]
        k = int(np.argmax(scores))
        if scores[k] / CV_REPEATS > best["f1"]:
            best = {"f1": round(float(scores[k]) / CV_REPEATS, 4), "C": c, "threshold": float(THRESHOLDS[k])}
    return best


def train(out: Path = ARTIFACT) -> dict[str, Any]:
    """Featurise the development data, cross-validate, fit on all of it, save; the metadata."""
    import sklearn
    from safetensors.numpy import save_file
    from sklearn.metrics import f1_score

    items, labels, groups, data_hash = development_data()
    x, y = features(items, SentenceEncoder(MINILM, MAX_TOKENS)), np.array(labels)
    carries = np.isin(y, sorted(FEEDBACK_LABELS))
    rules = [label in FEEDBACK_LABELS for label, _ in RulesClassifier().classify(items)]
    mean, scale = x.mean(0), x.std(0) + 1e-6
    x = (x - mean) / scale
    chosen = cross_validate(x, carries, groups)
    # Two heads on the same features: the binary one decides whether a follow-up carries
    # feedback (the decision that feeds rewrites), the multinomial one which label within
    # that group.
    feedback = _fit(x, carries, chosen["C"])
    model = _fit(x, y, chosen["C"])
    coef = np.zeros((len(FOLLOWUP_LABELS), x.shape[1]), dtype=np.float32)
    intercept = np.full(len(FOLLOWUP_LABELS), -30.0, dtype=np.float32)  # a label never seen: never chosen
    for row, label in enumerate(model.classes_):
        coef[FOLLOWUP_LABELS.index(label)], intercept[FOLLOWUP_LABELS.index(label)] = model.coef_[row], model.intercept_[row]
    out.mkdir(parents=True, exist_ok=True)
    save_file({"coef": coef, "intercept": intercept, "feedback_coef": feedback.coef_[0].astype(np.float32),
               "feedback_intercept": feedback.intercept_.astype(np.float32), "mean": mean.astype(np.float32),
               "scale": scale.astype(np.float32)}, str(out / "weights.safetensors"))
    meta = {"labels": list(FOLLOWUP_LABELS), "features_version": FEATURES_VERSION, "encoder": MINILM,
            "max_tokens": MAX_TOKENS, "C": chosen["C"], "feedback_threshold": chosen["threshold"],
            "cross_validated_feedback_f1": chosen["f1"], "folds": FOLDS, "cv_repeats": CV_REPEATS,
            "grouped_by": "conversation",
            "rules_feedback_f1_same_examples": round(float(f1_score(carries, rules)), 4),
            "training_examples": len(y), "training_data_sha256": data_hash,
            "training_data": [f"{Path(c).relative_to(REPO)} ({split or 'all'} labels)" for c, _, split in SOURCES],
            "scikit_learn": sklearn.__version__,
            "label_counts": {lab: int((y == lab).sum()) for lab in FOLLOWUP_LABELS}}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta | {"output": str(out)}
