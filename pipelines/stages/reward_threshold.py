"""Pair selection and threshold of the `rewards` stage (pipelines/stages/rewards.py, step 4).

Of one prompt's scored candidates, the best against the worst makes its pair
(`select_pair`), kept only when its margin clears this run's bar: the margin over the run's
pooled within-prompt spread (`zscore`, `rewards.min_z`) or the `rewards.quantile` of this
run's margins (`quantile`), because reward scales differ between backends and models.

The stage applies it in two passes over its parts: `select` in the actors that score,
`Threshold.fit` on the driver from margins and variances alone, `decide` per part.
`apply_threshold` is the same on plain rows in one process.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from pipelines.config import RewardsConfig

# Reasons a prompt yields no pair, in the order they are checked.
TOO_FEW_CANDIDATES = "too_few_candidates"
INVALID_SCORES = "invalid_scores"
IDENTICAL_CANDIDATES = "identical_candidates"
EMPTY_CANDIDATE = "empty_candidate"
# The best candidate was cut at the token limit: as chosen it would teach the policy to stop
# mid-answer (the chat template closes the turn after it).
TRUNCATED_CHOSEN = "truncated_chosen"
TIED_SCORES = "tied_scores"
BELOW_THRESHOLD = "below_threshold"


@dataclass(frozen=True)
class Selection:
    """Best versus worst of one prompt's candidates; `reason` says why there is no pair."""

    chosen: int | None
    rejected: int | None
    margin: float | None
    reason: str | None


def select_pair(candidates: Sequence[str], scores: Sequence[float],
                truncated: Sequence[bool] | None = None) -> Selection:
    """The highest-scored candidate (chosen) against the lowest (rejected), first index on
    ties; `reason` is set when they cannot make a pair, before any threshold. `truncated`:
    which candidates hit the token limit (None: unknown, as in runs made before it was kept)."""
    if len(candidates) != len(scores):
        raise ValueError(f"{len(candidates)} candidates but {len(scores)} scores")
    if len(scores) < 2:
        return Selection(None, None, None, TOO_FEW_CANDIDATES)
    if not all(math.isfinite(s) for s in scores):
        return Selection(None, None, None, INVALID_SCORES)
    if len({c.strip() for c in candidates}) == 1:
        return Selection(None, None, float(max(scores) - min(scores)), IDENTICAL_CANDIDATES)
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    margin = float(scores[best] - scores[worst])
    if margin <= 0:
        return Selection(None, None, margin, TIED_SCORES)
    if candidates[best].strip() == candidates[worst].strip():
        return Selection(best, worst, margin, IDENTICAL_CANDIDATES)
    if not candidates[best].strip() or not candidates[worst].strip():
        return Selection(best, worst, margin, EMPTY_CANDIDATE)
    if truncated and truncated[best]:
        return Selection(best, worst, margin, TRUNCATED_CHOSEN)
    return Selection(best, worst, margin, None)


def within_variance(scores: Sequence[float]) -> float | None:
    """The population variance of one prompt's scores; None under two scores."""
    if len(scores) < 2:
        return None
    mean = sum(scores) / len(scores)
    return sum((s - mean) ** 2 for s in scores) / len(scores)


def pooled_std(score_lists: Sequence[Sequence[float]]) -> float:
    """The reward model's typical spread within one prompt in this run: the square root of
    the mean within-prompt (population) variance. It carries the model's scale, so a margin
    divided by it reads the same for a judge in [0, 1] and a reward model's logits."""
    return pooled_std_of([within_variance(scores) for scores in score_lists])


def pooled_std_of(variances: Sequence[float | None]) -> float:
    present = [v for v in variances if v is not None]
    return math.sqrt(sum(present) / len(present)) if present else 0.0


def margin_zscore(margin: float, scale: float) -> float:
    """best - worst in units of the run's within-prompt spread (`pooled_std`); 0 if none."""
    return 0.0 if scale <= 0 else margin / scale


def quantile_cutoff(margins: Sequence[float], quantile: float) -> float:
    """The margin at `quantile` of this run's per-prompt margins (linear interpolation):
    margins at or above it are the top `1 - quantile`."""
    if not margins:
        return math.inf
    return float(pd.Series(margins, dtype="float64").quantile(quantile))


@dataclass(frozen=True)
class Threshold:
    """This run's bar for a pair: `min_z` times `scale` (zscore), or `cutoff` (quantile)."""

    scale: float
    cutoff: float | None

    @classmethod
    def fit(cls, margins: Sequence[float], variances: Sequence[float | None],
            settings: RewardsConfig) -> "Threshold":
        """From the margins and within-prompt variances of the prompts that make a pair."""
        stored = [as_stored(m) for m in margins]
        cutoff = quantile_cutoff(stored, settings.quantile) if settings.threshold == "quantile" else None
        return cls(pooled_std_of(variances), cutoff)

    def passes(self, margin: float, settings: RewardsConfig) -> bool:
        margin = as_stored(margin)
        if self.cutoff is None:
            return margin_zscore(margin, self.scale) >= settings.min_z
        return margin >= self.cutoff


def as_stored(margin: float) -> float:
    """The margin as the `samples` table stores it (float32): the stage fits the threshold on
    the actors' float64 margins and decides on the stored ones, and a margin at the cutoff
    must pass either way."""
    return float(np.float32(margin))


def select(row: dict[str, Any], drop_truncated: bool = True) -> dict[str, Any]:
    """Set a scored row's pair (`select_pair`): margin, chosen and rejected indices, and the
    reason it makes no pair; status stays unset until the threshold. Returns the row."""
    selection = select_pair(row["candidates"], row["scores"], row.get("truncated") if drop_truncated else None)
    row.update(margin=selection.margin, reason=selection.reason,
               chosen_index=selection.chosen, rejected_index=selection.rejected)
    return row


def decide(row: dict[str, Any], threshold: Threshold, settings: RewardsConfig) -> dict[str, Any]:
    """Set status and reason on a selected row; only a kept row names its pair."""
    reason = row["reason"]
    if reason is None and not threshold.passes(row["margin"], settings):
        reason = BELOW_THRESHOLD
    row["status"], row["reason"] = ("kept", None) if reason is None else ("filtered", reason)
    if reason is not None:
        row["chosen_index"] = row["rejected_index"] = None
    return row


def apply_threshold(rows: list[dict[str, Any]], settings: RewardsConfig) -> list[dict[str, Any]]:
    """Set status, reason and margin on scored rows (candidates, scores); rows that already
    carry a reason (over_cap) are left filtered. Returns the same rows. (The stage does
    the same in two passes over its parts: `select` in the workers, `decide` after.)"""
    open_rows = [select(row, settings.drop_truncated_chosen) for row in rows if not row.get("reason")]
    paired = [row for row in open_rows if row["reason"] is None]
    threshold = Threshold.fit([row["margin"] for row in paired],
                              [within_variance(row["scores"]) for row in paired], settings)
    for row in open_rows:
        decide(row, threshold, settings)
    return rows
