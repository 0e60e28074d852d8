"""Scoring a follow-up classifier backend against gold labels (`rlhi eval-followups`).

Every gold label is matched to a user turn of the input by (`conversation_hash`,
`message_index`): the turn's index in WildChat's `conversation` list, or in a run's
`turns`. No ingest filter applies: every labelled turn is scored. The headline is the
binary "carries feedback" decision (reattempt_feedback, correction or complaint), since
that decides which turns feed rewrites; per-label scores and macro-F1 show the rest.
Intervals are percentile bootstraps over follow-ups with a fixed seed, so a rerun gives
the same numbers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from pipelines.schema import FEEDBACK_LABELS, FOLLOWUP_LABELS

UNCLASSIFIED = "unclassified"
ClassifyBatch = Callable[[list[tuple]], list[tuple]]


def followup_examples(conversations: pa.Table) -> list[dict]:
    """One dict per user turn whose previous message is an assistant turn.

    Accepts WildChat's schema (column `conversation`) or a run's `conversations` table
    (column `turns`). Keys: conversation_hash, message_index, previous_user (the nearest
    earlier user message, None if there is none), answer, message.
    """
    column = "conversation" if "conversation" in conversations.column_names else "turns"
    for needed in (column, "conversation_hash"):
        if needed not in conversations.column_names:
            raise ValueError(f"conversations table has no column {needed!r} (columns: "
                             f"{conversations.column_names}); expected WildChat's "
                             "`conversation` or a run's `turns`, and `conversation_hash`")
    lists = conversations.column(column).combine_chunks()
    messages = lists.flatten()  # handles slicing and null lists
    roles = messages.field("role").to_pylist()
    contents = messages.field("content").to_pylist()
    lengths = lists.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    hashes = conversations.column("conversation_hash").to_pylist()
    examples, start = [], 0
    for conv_hash, length in zip(hashes, lengths):
        previous_user = None
        for i in range(int(length)):
            role, content = roles[start + i], contents[start + i] or ""
            if role == "user":
                if i > 0 and roles[start + i - 1] == "assistant":
                    examples.append({"conversation_hash": conv_hash, "message_index": i,
                                     "previous_user": previous_user,
                                     "answer": contents[start + i - 1] or "",
                                     "message": content})
                previous_user = content
        start += int(length)
    return examples


def load_gold_labels(path: str | Path) -> dict[tuple[str, int], str]:
    """Read gold labels (JSONL) into {(conversation_hash, message_index): label}.

    Keys `conversation_hash`, `message_index`, `label` are required; `feedback` and
    `rationale` are optional. A bad line is an error naming the file, line and field.
    """
    labels: dict[tuple[str, int], str] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for key in ("conversation_hash", "message_index", "label"):
                if key not in row:
                    raise ValueError(f"{where}: missing field {key!r}")
            conv_hash, index, label = row["conversation_hash"], row["message_index"], row["label"]
            if not isinstance(conv_hash, str) or not conv_hash:
                raise ValueError(f"{where}: field 'conversation_hash' must be a non-empty "
                                 f"string, got {conv_hash!r}")
            if isinstance(index, bool) or not isinstance(index, int) or index < 1:
                raise ValueError(f"{where}: field 'message_index' must be an integer >= 1 "
                                 f"(the follow-up's index in `conversation`), got {index!r}")
            if label not in FOLLOWUP_LABELS:
                raise ValueError(f"{where}: field 'label' has unknown label {label!r}; "
                                 f"allowed: {', '.join(FOLLOWUP_LABELS)}")
            if (conv_hash, index) in labels:
                raise ValueError(f"{where}: duplicate label for conversation_hash="
                                 f"{conv_hash!r} message_index={index}")
            labels[(conv_hash, index)] = label
    return labels


def _prf(tp, fp, fn):
    """Precision, recall, F1 (arrays or scalars); 0 where undefined."""
    tp, fp, fn = (np.asarray(x, dtype=float) for x in (tp, fp, fn))
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        r = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        f = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return p, r, f


def _metrics(g: np.ndarray, p: np.ndarray) -> dict[str, np.ndarray]:
    """Headline metrics from label codes: g gold, p predicted (len(FOLLOWUP_LABELS) for
    unclassified); in 2-D arrays, each row is one bootstrap resample."""
    is_fb = np.array([lab in FEEDBACK_LABELS for lab in FOLLOWUP_LABELS] + [False])
    gf, pf = is_fb[g], is_fb[p]
    prec, rec, f1 = _prf((gf & pf).sum(-1), (~gf & pf).sum(-1), (gf & ~pf).sum(-1))
    f1s, present = [], []
    for k in range(len(FOLLOWUP_LABELS)):
        gk, pk = g == k, p == k
        f1s.append(_prf((gk & pk).sum(-1), (~gk & pk).sum(-1), (gk & ~pk).sum(-1))[2])
        present.append((gk | pk).any(-1))
    # Macro over the labels present in gold or predictions, as scikit-learn averages.
    f1s, present = np.array(f1s), np.array(present)
    macro = (f1s * present).sum(0) / np.maximum(present.sum(0), 1)
    return {"feedback_precision": prec, "feedback_recall": rec, "feedback_f1": f1,
            "macro_f1": macro}


def score(gold: Sequence[str], predicted: Sequence[str | None], seed: int = 0,
          n_boot: int = 1000) -> dict:
    """Score predictions against gold labels, with 95% bootstrap intervals.

    A None prediction (unclassified) counts as "no feedback" and as no label, and is
    counted in `unclassified`.
    """
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions")
    if not gold:
        raise ValueError("nothing to score: no gold labels")
    code = {lab: k for k, lab in enumerate(FOLLOWUP_LABELS)}
    for name, labels in (("gold", gold), ("predicted", predicted)):
        bad = sorted({str(lab) for lab in labels if lab not in code and
                      not (name == "predicted" and lab is None)})
        if bad:
            raise ValueError(f"unknown {name} label(s) {bad}; allowed: "
                             f"{', '.join(FOLLOWUP_LABELS)}")
    none = len(FOLLOWUP_LABELS)
    g = np.array([code[lab] for lab in gold])
    p = np.array([none if lab is None else code[lab] for lab in predicted])
    result: dict = {"n": len(g), "unclassified": int((p == none).sum()),
                    "accuracy": float((g == p).mean())}
    point = _metrics(g, p)
    result.update({k: float(v) for k, v in point.items()})
    rng, boot = np.random.default_rng(seed), {k: [] for k in point}
    step = max(1, 2_000_000 // len(g))  # resamples per block, to bound memory
    for start in range(0, n_boot, step):
        idx = rng.integers(0, len(g), size=(min(step, n_boot - start), len(g)))
        for key, values in _metrics(g[idx], p[idx]).items():
            boot[key].append(values)
    for key, values in boot.items():
        lo, hi = np.percentile(np.concatenate(values), [2.5, 97.5])
        result[f"{key}_ci"] = [float(lo), float(hi)]
    result["per_label"] = {}
    for k, lab in enumerate(FOLLOWUP_LABELS):
        prec, rec, f1 = _prf(((g == k) & (p == k)).sum(), ((g != k) & (p == k)).sum(),
                             ((g == k) & (p != k)).sum())
        result["per_label"][lab] = {"precision": float(prec), "recall": float(rec),
                                    "f1": float(f1), "support": int((g == k).sum())}
    columns = [*FOLLOWUP_LABELS, UNCLASSIFIED]
    result["confusion"] = {gl: {columns[c]: int(((g == r) & (p == c)).sum())
                                for c in range(len(columns))}
                           for r, gl in enumerate(FOLLOWUP_LABELS)}
    return result


def read_conversations(path: str | Path) -> pa.Table:
    """Read the columns scoring needs from a Parquet file, or the `*.parquet` files of a folder
    (a run's `conversations` table)."""
    path = Path(path)
    files = sorted(str(f) for f in path.rglob("*.parquet")) if path.is_dir() else [str(path)]
    if not files:
        raise ValueError(f"no *.parquet files under {path}")
    dataset = ds.dataset(files, format="parquet")
    names = dataset.schema.names
    column = "conversation" if "conversation" in names else "turns"
    return dataset.to_table(columns=[c for c in ("conversation_hash", column) if c in names])


def evaluate_backend(conversations_path: str | Path, labels_path: str | Path,
                     classify_batch: ClassifyBatch, seed: int = 0,
                     n_boot: int = 1000) -> dict:
    """Classify every gold-labelled follow-up of the input with `classify_batch` and score.

    `classify_batch` takes [(previous_user, answer, message)] and returns
    [(label or None, confidence)]. A gold label without a matching follow-up is an error.
    """
    gold = load_gold_labels(labels_path)
    examples: dict[tuple[str, int], dict] = {}
    hashes = set()
    for ex in followup_examples(read_conversations(conversations_path)):
        hashes.add(ex["conversation_hash"])
        # WildChat's hash is of the text alone: a repeated hash is the same conversation.
        examples.setdefault((ex["conversation_hash"], ex["message_index"]), ex)
    missing = [key for key in gold if key not in examples]
    if missing:
        conv_hash, index = missing[0]
        why = ("is not a user turn right after an assistant turn" if conv_hash in hashes
               else "has no conversation with that hash")
        raise ValueError(f"{labels_path}: gold label conversation_hash={conv_hash!r} "
                         f"message_index={index} {why} in {conversations_path} "
                         f"({len(missing)} unmatched label(s) in all)")
    rows = [examples[key] for key in gold]
    items = [(ex["previous_user"], ex["answer"], ex["message"]) for ex in rows]
    predictions = classify_batch(items)
    if len(predictions) != len(items):
        raise ValueError(f"backend returned {len(predictions)} results for "
                         f"{len(items)} follow-ups")
    result = score(list(gold.values()), [label for label, _ in predictions], seed, n_boot)
    result["followups_in_input"] = len(examples)
    return result


def format_report(result: dict) -> str:
    """The score table as plain text, for the terminal."""
    def ci(key: str) -> str:
        lo, hi = result[f"{key}_ci"]
        return f"{result[key]:.3f} [{lo:.3f}, {hi:.3f}]"

    lines = [f"follow-ups scored: {result['n']} (unclassified: {result['unclassified']})",
             f"carries feedback  precision {ci('feedback_precision')}",
             f"                  recall    {ci('feedback_recall')}",
             f"                  F1        {ci('feedback_f1')}",
             f"macro-F1          {ci('macro_f1')}   accuracy {result['accuracy']:.3f}",
             "", f"{'label':<20}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
    for label, m in result["per_label"].items():
        lines.append(f"{label:<20}{m['precision']:>10.3f}{m['recall']:>10.3f}"
                     f"{m['f1']:>10.3f}{m['support']:>9d}")
    return "\n".join(lines)
