"""Pipeline counters exported with `ray.util.metrics`, so the Ray dashboard's metrics view
and Prometheus show them next to Ray's own: rows per stage, follow-ups by label, pairs by
source, judge calls, DPO steps. The driver records each stage's counts when it finishes.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _counters():
    from ray.util.metrics import Counter

    return {
        "rows": Counter("rlhi_stage_rows", "Rows a stage read or wrote, by kind",
                        tag_keys=("stage", "round", "kind")),
        "labels": Counter("rlhi_followups", "Follow-ups by label", tag_keys=("label",)),
        "pairs": Counter("rlhi_pairs", "Preference pairs by source and split",
                         tag_keys=("round", "source", "split")),
        "judge": Counter("rlhi_judge_calls", "Pairwise judge calls (rewrites quality filter)",
                         tag_keys=("round",)),
        "steps": Counter("rlhi_dpo_steps", "DPO optimizer steps", tag_keys=("round",)),
    }


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def export_stage_metrics(stage: str, round_index: int, summary: dict[str, Any]) -> None:
    """Add one finished stage's counts to the counters (top-level numbers, labels, pairs)."""
    counters, tags = _counters(), {"stage": stage, "round": str(round_index)}
    for kind, value in summary.items():
        if _number(value) and kind not in ("seconds", "round", "workers", "steps"):
            counters["rows"].inc(value, tags={**tags, "kind": kind})
    if stage == "followups":
        for label, count in (summary.get("labels") or {}).items():
            if _number(count):
                counters["labels"].inc(count, tags={"label": label})
    if stage == "pairs":
        for source, splits in (summary.get("by_source") or {}).items():
            for split, count in (splits.items() if isinstance(splits, dict) else []):
                if _number(count):
                    counters["pairs"].inc(count, tags={"round": str(round_index), "source": source, "split": split})
    if stage == "rewrites" and _number(summary.get("judged")):
        counters["judge"].inc(summary["judged"], tags={"round": str(round_index)})
    if stage == "train" and _number(summary.get("steps")):
        counters["steps"].inc(summary["steps"], tags={"round": str(round_index)})
