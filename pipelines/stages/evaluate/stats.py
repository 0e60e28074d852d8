"""Statistics of the evaluate stage: win scores, a bootstrap over users, length control.

Win score of one comparison (trained vs base): 1 a win, 0.5 a tie, 0 a loss, so a judge
that cannot tell the arms apart scores 0.5. The Judge asks both orders and calls a verdict
that flips with the order a tie (actors/judge.py), so ties also absorb position bias.

Intervals are percentile bootstraps over USERS, not turns (pipelines/bootstrap.py): one
user's turns share a persona, a topic and a writing style, so they are correlated.

Length control follows the idea of AlpacaEval's length-controlled win rate (Dubois et al.
2024): fit a logistic regression of the win score on the answers' length difference and
read the win probability at zero difference, i.e. what the win rate would be if both arms
wrote equally long answers. Here the one regressor is the difference in words (trained
minus base) divided by the mean words of the pair (a relative difference, so it means the
same for short and long answers); ties enter as the target 0.5 (a fractional response).
A small ridge penalty keeps the fit finite when the wins are perfectly separated by length.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from pipelines.bootstrap import cluster_interval

SCORES = {"a": 1.0, "tie": 0.5, "b": 0.0}   # the Judge's winner, with the trained arm as "a"
RIDGE = 1e-3


def win_score(winner: str) -> float:
    """1 a win of answer a, 0.5 a tie, 0 a loss."""
    return SCORES[winner]


def summarize(values: Sequence[float], users: Sequence[str], *, samples: int,
              seed: int) -> dict[str, float]:
    """{mean, ci_low, ci_high, n, users}: a mean with its bootstrap interval over users."""
    values = np.asarray(values, dtype=float)
    low, high = cluster_interval(lambda idx: float(values[idx].mean()), users, samples=samples, seed=seed)
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
    low, high = cluster_interval(lambda idx: logistic_at_zero(x[idx], y[idx]), users, samples=samples, seed=seed)
    return {"mean": logistic_at_zero(x, y), "ci_low": low, "ci_high": high, "n": len(y),
            "users": len(set(users)), "method": "logistic regression of the win score on the "
            "relative word-count difference, read at zero difference"}


def outcome_shares(winners: Sequence[str], users: Sequence[str], *, samples: int,
                   seed: int) -> dict[str, dict[str, float]]:
    """Win / tie / loss shares of answer a, each with its bootstrap interval over users."""
    return {name: summarize([float(w == winner) for w in winners], users, samples=samples, seed=seed)
            for name, winner in (("win", "a"), ("tie", "tie"), ("loss", "b"))}
