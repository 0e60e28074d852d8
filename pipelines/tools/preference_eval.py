"""Score the persona extractor's reading of feedback messages against gold stated preferences
(`rlhi eval-preferences`).

    rlhi eval-preferences --input CONVERSATIONS --labels FILE [--split NAME] [--json]

The labels are the follow-up label JSONL (`data/wildchat-more/followup_labels.jsonl`):
every follow-up whose gold label carries feedback has `preferences`, a list of
`{"dimension", "value"}` in the persona's vocabulary (length, format, register, examples,
ending, language; GUIDELINES.md beside the labels), empty when the message states none.
Each such message is read with `actors.persona_extractive.message_preferences` (with the
answer it reacts to, for bare counts) plus `stated_languages`, exactly what the persona
builder reads. Scores are micro precision and recall over (dimension, value) pairs, and the
share of messages read exactly right, over all feedback messages and over those that state
something; intervals are bootstraps over conversations (pipelines/bootstrap.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from actors.followup_labels import FEEDBACK_LABELS
from actors.persona_extractive import message_preferences, stated_languages
from pipelines.bootstrap import cluster_intervals, format_interval
from pipelines.tools.followup_eval import followup_examples, label_rows, read_conversations

HEADLINE = ("precision", "recall", "exact", "exact_stating")


def extracted(message: str, answer: str) -> set[tuple[str, str]]:
    """What the persona builder reads from one feedback message, in the labels' vocabulary."""
    found = {(dim, value) for dim, value in message_preferences(message, answer) if dim != "code"}
    return found | {("language", name) for name in stated_languages(message)}


def load_preference_labels(path: str | Path, split: str | None = None) -> dict[tuple[str, int], set]:
    """{(conversation_hash, message_index): {(dimension, value)}} for the feedback follow-ups,
    every line checked as `followup_eval.label_rows` says. A feedback label without
    `preferences` is an error naming the file and line."""
    gold = {}
    for where, row in label_rows(path, split):
        if row["label"] not in FEEDBACK_LABELS:
            continue
        if not isinstance(row.get("preferences"), list):
            raise ValueError(f"{where}: a feedback label without a 'preferences' list; add one "
                             "([] when the message states none)")
        gold[row["conversation_hash"], row["message_index"]] = {(p["dimension"], p["value"]) for p in row["preferences"]}
    return gold


def score(gold: list[set], read: list[set], clusters: list[str], seed: int = 0, n_boot: int = 1000) -> dict:
    """Micro precision/recall over pairs, exact-match shares, with intervals over clusters."""
    tp = np.array([len(g & r) for g, r in zip(gold, read)], dtype=float)
    fp = np.array([len(r - g) for g, r in zip(gold, read)], dtype=float)
    fn = np.array([len(g - r) for g, r in zip(gold, read)], dtype=float)
    exact = np.array([g == r for g, r in zip(gold, read)], dtype=float)
    stating = np.array([bool(g) for g in gold])

    def numbers(idx: np.ndarray) -> list[float]:
        t, p, n = tp[idx].sum(), fp[idx].sum(), fn[idx].sum()
        s = idx[stating[idx]]
        return [t / (t + p) if t + p else 0.0, t / (t + n) if t + n else 0.0,
                float(exact[idx].mean()) if len(idx) else 0.0, float(exact[s].mean()) if len(s) else 0.0]

    result = {"messages": len(gold), "stating": int(stating.sum()), "pairs": int(tp.sum() + fn.sum()),
              "read": int(tp.sum() + fp.sum()), "conversations": len(set(clusters))}
    result.update(dict(zip(HEADLINE, numbers(np.arange(len(gold))))))
    for key, (low, high) in zip(HEADLINE, cluster_intervals(numbers, clusters, samples=n_boot, seed=seed)):
        result[f"{key}_ci"] = [low, high]
    return result


def evaluate_extractor(conversations_path: str | Path, labels_path: str | Path, split: str | None = None,
                       seed: int = 0) -> dict:
    """Read every gold feedback message of the input and score what the extractor finds."""
    gold = load_preference_labels(labels_path, split)
    examples = {(e["conversation_hash"], e["message_index"]): e
                for e in followup_examples(read_conversations(conversations_path))}
    missing = sorted(set(gold) - set(examples))
    if missing:
        raise ValueError(f"{labels_path}: {len(missing)} labelled follow-ups are not in {conversations_path}, "
                         f"e.g. conversation_hash={missing[0][0]!r} message_index={missing[0][1]}")
    keys = sorted(gold)
    read = [extracted(examples[k]["message"], examples[k]["answer"]) for k in keys]
    result = score([gold[k] for k in keys], read, [k[0] for k in keys], seed=seed)
    result["split"] = split
    return result


def format_report(result: dict) -> str:
    """The scores as a few lines."""
    return "\n".join([
        f"feedback messages: {result['messages']} in {result['conversations']} conversations"
        f"{' (split ' + result['split'] + ')' if result.get('split') else ''}, {result['stating']} stating "
        f"{result['pairs']} preferences; the extractor read {result['read']}; intervals over conversations",
        f"precision          {format_interval(result, 'precision')}",
        f"recall             {format_interval(result, 'recall')}",
        f"exact (all)        {format_interval(result, 'exact')}",
        f"exact (stating)    {format_interval(result, 'exact_stating')}"])
