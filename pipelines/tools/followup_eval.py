"""Scoring a follow-up classifier backend against gold labels (`rlhi eval-followups`).

Every gold label is matched to a user turn of the input by (`conversation_hash`,
`message_index`): the turn's index in WildChat's `conversation` list, or in a run's
`turns`. No ingest filter applies: every labelled turn is scored. The headline is the
binary "carries feedback" decision (reattempt_feedback, correction or complaint), since
that decides which turns feed rewrites; per-label scores and macro-F1 show the rest.
Intervals are percentile bootstraps over conversations (pipelines/bootstrap.py): the
follow-ups of one conversation share a user, a task and an assistant, so resampling them
one by one would give intervals that are too narrow. Seeded, so a rerun gives the same
numbers. Precision, recall, F1 and the confusion matrix are scikit-learn's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from pipelines.bootstrap import cluster_intervals, format_interval
from pipelines.contract import json_object_lines
from pipelines.schema import FEEDBACK_LABELS, FOLLOWUP_LABELS

UNCLASSIFIED = "unclassified"
ClassifyBatch = Callable[[list[tuple]], list[tuple]]


def followup_examples(conversations: pa.Table) -> list[dict]:
    """One dict per user turn whose previous message is an assistant turn.

    Accepts WildChat's schema (column `conversation`) or a run's `conversations` table
    (column `turns`). Keys: conversation_hash, message_index, previous_user (the nearest
    earlier user message, None if there is none), answer, message, context (every turn
    before the answer, as the follow-ups stage gives a model classifier).
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
                    context = [{"role": roles[start + j], "content": contents[start + j] or ""} for j in range(i - 1)]
                    examples.append({"conversation_hash": conv_hash, "message_index": i,
                                     "previous_user": previous_user,
                                     "answer": contents[start + i - 1] or "",
                                     "message": content, "context": context})
                previous_user = content
        start += int(length)
    return examples


def label_rows(path: str | Path, split: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each label line of a gold-label JSONL file as ("file:line", row), checked.

    Keys `conversation_hash`, `message_index`, `label` are required; `feedback`,
    `rationale`, `split` and `preferences` are optional. With `split`, only the rows of that
    split are yielded (a file without `split` fields is then an error). A bad line is an
    error naming the file, line and field; so is a second label for the same follow-up.
    """
    seen: set[tuple[str, int]] = set()
    for where, row in json_object_lines(path):
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
        if split is not None and "split" not in row:
            raise ValueError(f"{where}: no field 'split', but --split {split} was asked for")
        if split is not None and row["split"] != split:
            continue
        if (conv_hash, index) in seen:
            raise ValueError(f"{where}: duplicate label for conversation_hash="
                             f"{conv_hash!r} message_index={index}")
        seen.add((conv_hash, index))
        yield where, row


def load_gold_labels(path: str | Path, split: str | None = None) -> dict[tuple[str, int], str]:
    """Read gold labels (JSONL) into {(conversation_hash, message_index): label}; every line
    checked as `label_rows` says."""
    return {(row["conversation_hash"], row["message_index"]): row["label"] for _, row in label_rows(path, split)}


NONE = "(none)"  # an unclassified follow-up: no label, no feedback


def _feedback(labels: np.ndarray) -> np.ndarray:
    return np.isin(labels, sorted(FEEDBACK_LABELS))


HEADLINE = ("feedback_precision", "feedback_recall", "feedback_f1", "macro_f1")


def _headline(gold: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """"Carries feedback" precision, recall and F1, and macro-F1 over the labels present in
    gold or predictions (scikit-learn's definitions and averaging)."""
    p, r, f, _ = precision_recall_fscore_support(_feedback(gold), _feedback(predicted), average="binary",
                                                 zero_division=0)
    present = sorted(set(gold) | set(predicted) - {NONE})
    macro = f1_score(gold, predicted, labels=present, average="macro", zero_division=0)
    return {"feedback_precision": float(p), "feedback_recall": float(r), "feedback_f1": float(f),
            "macro_f1": float(macro)}


def _headline_from_counts(matrix: np.ndarray) -> list[float]:
    """The same four numbers from a confusion matrix (labels then NONE, as `score` builds it):
    the bootstrap's fast path, checked against `_headline` on the full sample."""
    feedback = np.array([lab in FEEDBACK_LABELS for lab in FOLLOWUP_LABELS] + [False])
    tp = matrix[np.ix_(feedback, feedback)].sum()
    fp, fn = matrix[np.ix_(~feedback, feedback)].sum(), matrix[np.ix_(feedback, ~feedback)].sum()
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    diag, column, row = np.diag(matrix), matrix.sum(0), matrix.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1s = np.where(column + row > 0, 2 * diag / (column + row), 0.0)[:-1]
    shown = (row[:-1] > 0) | (column[:-1] > 0)  # the labels present in gold or predictions
    return [p, r, f, float(f1s[shown].mean()) if shown.any() else 0.0]


def score(gold: Sequence[str], predicted: Sequence[str | None], seed: int = 0,
          n_boot: int = 1000, clusters: Sequence[str] | None = None) -> dict:
    """Score predictions against gold labels, with 95% bootstrap intervals over `clusters`
    (the follow-ups' conversations; default: each follow-up its own).

    A None prediction (unclassified) counts as "no feedback" and as no label, and is
    counted in `unclassified`.
    """
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions")
    if not gold:
        raise ValueError("nothing to score: no gold labels")
    for name, labels in (("gold", gold), ("predicted", predicted)):
        bad = sorted({str(lab) for lab in labels if lab not in FOLLOWUP_LABELS and
                      not (name == "predicted" and lab is None)})
        if bad:
            raise ValueError(f"unknown {name} label(s) {bad}; allowed: "
                             f"{', '.join(FOLLOWUP_LABELS)}")
    g = np.array(list(gold), dtype=object)
    p = np.array([NONE if lab is None else lab for lab in predicted], dtype=object)
    clusters = list(range(len(g))) if clusters is None else list(clusters)
    result: dict = {"n": len(g), "unclassified": int((p == NONE).sum()), "accuracy": float((g == p).mean()),
                    "conversations": len(set(clusters))}
    result.update(_headline(g, p))
    columns = [*FOLLOWUP_LABELS, NONE]
    code = {lab: k for k, lab in enumerate(columns)}
    gi, pi = np.array([code[x] for x in g]), np.array([code[x] for x in p])

    def counts(idx: np.ndarray) -> list[float]:
        matrix = np.zeros((len(columns), len(columns)), dtype=np.int64)
        np.add.at(matrix, (gi[idx], pi[idx]), 1)
        return _headline_from_counts(matrix)

    if not np.allclose(counts(np.arange(len(g))), [result[k] for k in HEADLINE]):
        raise RuntimeError("the bootstrap's counts disagree with scikit-learn's scores: this is a bug")
    for key, (low, high) in zip(HEADLINE, cluster_intervals(counts, clusters, samples=n_boot, seed=seed)):
        result[f"{key}_ci"] = [low, high]
    precision, recall, f1, support = precision_recall_fscore_support(g, p, labels=list(FOLLOWUP_LABELS),
                                                                     zero_division=0)
    result["per_label"] = {lab: {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
                                 "support": int(support[k])} for k, lab in enumerate(FOLLOWUP_LABELS)}
    matrix = confusion_matrix(g, p, labels=columns)
    result["confusion"] = {gl: {(UNCLASSIFIED if c == NONE else c): int(matrix[r][j]) for j, c in enumerate(columns)}
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
                     n_boot: int = 1000, split: str | None = None, with_context: bool = False) -> dict:
    """Classify every gold-labelled follow-up of the input with `classify_batch` and score,
    with intervals over conversations. `split`: only the labels of that split.

    `classify_batch` takes [(previous_user, answer, message)] (with `with_context`, each
    item also carries the turns before the answer, as the stage gives a model backend) and
    returns [(label or None, confidence)]. A gold label without a matching follow-up is an
    error.
    """
    gold = load_gold_labels(labels_path, split)
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
    items = [(ex["previous_user"], ex["answer"], ex["message"], *([ex["context"]] if with_context else []))
             for ex in rows]
    predictions = classify_batch(items)
    if len(predictions) != len(items):
        raise ValueError(f"backend returned {len(predictions)} results for "
                         f"{len(items)} follow-ups")
    result = score(list(gold.values()), [label for label, _ in predictions], seed, n_boot,
                   clusters=[conv_hash for conv_hash, _ in gold])
    result["followups_in_input"] = len(examples)
    result["split"] = split
    return result


def format_report(result: dict) -> str:
    """The score table as plain text, for the terminal."""
    lines = [f"follow-ups scored: {result['n']} in {result['conversations']} conversations"
             f"{' (split ' + result['split'] + ')' if result.get('split') else ''} "
             f"(unclassified: {result['unclassified']}); intervals over conversations",
             f"carries feedback  precision {format_interval(result, 'feedback_precision')}",
             f"                  recall    {format_interval(result, 'feedback_recall')}",
             f"                  F1        {format_interval(result, 'feedback_f1')}",
             f"macro-F1          {format_interval(result, 'macro_f1')}   accuracy {result['accuracy']:.3f}",
             "", f"{'label':<20}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
    for label, m in result["per_label"].items():
        lines.append(f"{label:<20}{m['precision']:>10.3f}{m['recall']:>10.3f}"
                     f"{m['f1']:>10.3f}{m['support']:>9d}")
    return "\n".join(lines)
