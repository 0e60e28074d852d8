"""Bootstrap intervals over clusters: the one helper every figure with an interval uses.

Rows that share a user (or a conversation) are correlated: one user's turns share a
persona, a topic and a writing style; one conversation's follow-ups share a context.
Resampling rows would give intervals that are too narrow, so each bootstrap draw resamples
whole clusters with replacement and computes the statistic over all rows of the drawn
clusters (a cluster bootstrap; Field & Welsh 2007). The resampling and the percentile
interval are `scipy.stats.bootstrap`'s, over the cluster indices; seeded, so a rerun gives
the same interval.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np
from scipy import stats

SAMPLES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A statistic and its bootstrap interval."""

    mean: float
    ci_low: float
    ci_high: float

    def to_json(self) -> dict[str, float]:
        return {"mean": round(self.mean, 4), "ci_low": round(self.ci_low, 4), "ci_high": round(self.ci_high, 4)}


def cluster_intervals(statistic: Callable[[np.ndarray], Sequence[float]], clusters: Sequence[Hashable], *,
                      samples: int = SAMPLES, seed: int = 0,
                      confidence: float = CONFIDENCE) -> list[tuple[float, float]]:
    """Percentile intervals of each number `statistic(row_indices)` returns, when whole
    clusters are resampled (one pass of draws for all of them).

    `clusters[i]` is row i's cluster (a user id, a conversation id). `statistic` receives
    the indices of the rows of the drawn clusters (with repeats)."""
    if len(clusters) == 0:
        return [(float("nan"), float("nan"))] * len(statistic(np.arange(0)))
    groups: dict[Hashable, list[int]] = {}
    for row, cluster in enumerate(clusters):
        groups.setdefault(cluster, []).append(row)
    members = [np.asarray(rows) for rows in groups.values()]
    if len(members) == 1:  # one user says nothing of how the figure varies between users:
        return [(float("nan"), float("nan"))] * len(statistic(members[0]))  # no interval, not a zero-width one

    def over_clusters(drawn: np.ndarray) -> np.ndarray:
        return np.asarray(statistic(np.concatenate([members[c] for c in drawn])), dtype=float)

    result = stats.bootstrap((np.arange(len(members)),), over_clusters, vectorized=False, paired=False,
                             n_resamples=samples, confidence_level=confidence, method="percentile",
                             random_state=np.random.default_rng(seed))
    lows, highs = np.atleast_1d(result.confidence_interval.low), np.atleast_1d(result.confidence_interval.high)
    return [(float(lo), float(hi)) for lo, hi in zip(lows, highs)]


def cluster_interval(statistic: Callable[[np.ndarray], float], clusters: Sequence[Hashable], *,
                     samples: int = SAMPLES, seed: int = 0,
                     confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile interval of one number `statistic(row_indices)` over resampled clusters."""
    return cluster_intervals(lambda idx: [statistic(idx)], clusters, samples=samples, seed=seed,
                             confidence=confidence)[0]


def mean_interval(values: Sequence[float], clusters: Sequence[Hashable] | None = None, *,
                  samples: int = SAMPLES, seed: int = 0, confidence: float = CONFIDENCE) -> Interval:
    """The mean of `values` with its interval over `clusters` (default: each value its own)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        raise ValueError("mean_interval needs at least one value")
    clusters = range(len(values)) if clusters is None else clusters
    low, high = cluster_interval(lambda idx: values[idx].mean(), list(clusters), samples=samples, seed=seed,
                                 confidence=confidence)
    return Interval(float(values.mean()), low, high)


def paired_difference(a: Mapping[str, float], b: Mapping[str, float], *, samples: int = SAMPLES,
                      seed: int = 0, confidence: float = CONFIDENCE) -> Interval:
    """mean(a[u] - b[u]) over the users both hold, with its interval over users: a drawn
    user's two scores move together, so what users share cancels out."""
    users = sorted(a.keys() & b.keys())
    if not users:
        raise ValueError("paired_difference: the two arms share no users")
    return mean_interval([a[u] - b[u] for u in users], samples=samples, seed=seed, confidence=confidence)


def format_interval(result: dict, key: str) -> str:
    """`result[key]` with its interval `result[key + "_ci"]`: "0.612 [0.464, 0.767]"."""
    low, high = result[f"{key}_ci"]
    return f"{result[key]:.3f} [{low:.3f}, {high:.3f}]"
