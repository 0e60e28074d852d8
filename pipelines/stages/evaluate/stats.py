"""Statistics of the evaluate stage: win scores, a bootstrap over users, length control.

Win score of one comparison (trained vs base): 1 a win, 0.5 a tie, 0 a loss, so a judge
that cannot tell the arms apart scores 0.5. The Judge asks both orders and calls a verdict
that flips with the order a tie (actors/judge.py), so ties also absorb position bias.

Intervals are percentile bootstraps over USERS, not turns: one user's turns share a persona,
a topic and a writing style, so they are correlated, and resampling turns would give
intervals that are too narrow. Each bootstrap draw resamples users with replacement and
takes the mean over all turns of the drawn users (a cluster bootstrap), seeded.

Length control follows the idea of AlpacaEval's length-controlled win rate (Dubois et al.
2024): fit a logistic regression of the win score on the answers' length difference and
read the win probability at zero difference, i.e. what the win rate would be if both arms
wrote equally long answers. Here the one regressor is the difference in words (trained
minus base) divided by the mean words of the pair (a relative difference, so it means the
same for short and long answers); ties enter as the target 0.5 (a fractional response).
A small ridge penalty keeps the fit finite when the wins are perfectly separated by length.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

SCORES = {"a": 1.0, "tie": 0.5, "b": 0.0}   # the Judge's winner, with the trained arm as "a"
RIDGE = 1e-3


def win_score(winner: str) -> float:
    """1 a win of answer a, 0.5 a tie, 0 a loss."""
    return SCORES[winner]


def bootstrap_users(values: Sequence[float], users: Sequence[str], *, samples: int = 1000,
                    seed: int = 0, confidence: float = 0.95,
                    statistic: Callable[[np.ndarray], float] | None = None) -> tuple[float, float]:
    """Percentile interval of `statistic` (default: the mean of `values`) under resampling
    of users with replacement. `statistic` receives the indices of the drawn turns."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return float("nan"), float("nan")
    statistic = statistic or (lambda idx: float(values[idx].mean()))
    groups: dict[str, list[int]] = {}
    for i, user in enumerate(users):
        groups.setdefault(user, []).append(i)
    members = [np.asarray(idx) for idx in groups.values()]
    rng = np.random.default_rng(seed)
    draws = np.empty(samples)
    for s in range(samples):
        chosen = rng.integers(0, len(members), size=len(members))
        draws[s] = statistic(np.concatenate([members[c] for c in chosen]))
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(draws, tail)), float(np.percentile(draws, 100 - tail))


def summarize(values: Sequence[float], users: Sequence[str], *, samples: int,
              seed: int) -> dict[str, float]:
    """{mean, ci_low, ci_high, n, users}: a mean with its bootstrap interval over users."""
    low, high = bootstrap_users(values, users, samples=samples, seed=seed)
    return {"mean": float(np.mean(values)) if len(values) else float("nan"),
            "ci_low": low, "ci_high": high, "n": len(values), "users": len(set(users))}


def relative_length_difference(words_a: Sequence[float], words_b: Sequence[float]) -> np.ndarray:
    """(a - b) / mean(a, b) per pair; 0 when both are empty."""
    a, b = np.asarray(words_a, dtype=float), np.asarray(words_b, dtype=float)
    scale = np.maximum((a + b) / 2, 1.0)
    return (a - b) / scale


def logistic_at_zero(x: Sequence[float], y: Sequence[float], iterations: int = 50) -> float:
    """P(y=1 | x=0) under a logistic regression y ~ sigmoid(b0 + b1 x), fitted by Newton's
    method on the cross-entropy (y may be fractional), with a small ridge on both weights."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) == 0:
        return float("nan")
    design = np.column_stack([np.ones_like(x), x])
    weights = np.zeros(2)
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-design @ weights))
        gradient = design.T @ (p - y) + RIDGE * len(x) * weights
        hessian = design.T @ (design * (p * (1 - p))[:, None]) + RIDGE * len(x) * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        weights -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return float(1 / (1 + np.exp(-weights[0])))


def length_controlled(scores: Sequence[float], words_a: Sequence[float], words_b: Sequence[float],
                      users: Sequence[str], *, samples: int, seed: int) -> dict[str, float]:
    """The length-controlled win rate of a over b with its bootstrap interval over users."""
    x = relative_length_difference(words_a, words_b)
    y = np.asarray(scores, dtype=float)
    low, high = bootstrap_users(y, users, samples=samples, seed=seed,
                                statistic=lambda idx: logistic_at_zero(x[idx], y[idx]))
    return {"mean": logistic_at_zero(x, y), "ci_low": low, "ci_high": high, "n": len(y),
            "users": len(set(users)), "method": "logistic regression of the win score on the "
            "relative word-count difference, read at zero difference"}


def outcome_shares(winners: Sequence[str], users: Sequence[str], *, samples: int,
                   seed: int) -> dict[str, dict[str, float]]:
    """Win / tie / loss shares of answer a, each with its bootstrap interval over users."""
    return {name: summarize([float(w == winner) for w in winners], users, samples=samples, seed=seed)
            for name, winner in (("win", "a"), ("tie", "tie"), ("loss", "b"))}
