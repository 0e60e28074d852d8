"""The cluster bootstrap every interval comes from (pipelines/bootstrap.py)."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.bootstrap import Interval, cluster_interval, mean_interval, paired_difference


def test_bootstrap_of_all_wins_is_one_to_one():
    assert mean_interval([1.0] * 12, [f"u{i % 4}" for i in range(12)], samples=200) == Interval(1.0, 1.0, 1.0)


def test_bootstrap_over_users_covers_the_true_win_rate():
    rng = np.random.default_rng(3)
    users = [f"u{u}" for u in range(40) for _ in range(5)]
    wins = (rng.random(len(users)) < 0.7).astype(float)
    low, high = cluster_interval(lambda idx: float(np.mean(np.asarray(wins)[idx])), users, samples=500, seed=0)
    assert low < 0.7 < high and high - low < 0.25


def test_bootstrap_resamples_users_not_turns():
    # Each user all wins or all losses: the turns are perfectly correlated within a user, so
    # the interval must be as wide as with one turn per user (4 users), not 40 turns.
    users = [f"u{u}" for u in range(4) for _ in range(10)]
    wins = [1.0 if u in ("u0", "u1") else 0.0 for u in users]
    low, high = cluster_interval(lambda idx: float(np.mean(np.asarray(wins)[idx])), users, samples=500, seed=0)
    assert low <= 0.25 and high >= 0.75


def test_bootstrap_interval_brackets_the_mean_and_repeats_with_the_seed():
    values = [0.2, 0.4, 0.5, 0.6, 0.9, 1.0]
    iv = mean_interval(values, seed=1)
    assert iv.ci_low <= iv.mean <= iv.ci_high
    assert iv.mean == pytest.approx(sum(values) / len(values))
    assert mean_interval(values, seed=1) == iv


def test_constant_values_have_a_zero_width_interval():
    iv = mean_interval([0.5] * 8, seed=0)
    assert (iv.ci_low, iv.mean, iv.ci_high) == pytest.approx((0.5, 0.5, 0.5))


def test_paired_difference_removes_the_shared_user_effect():
    # Users differ a lot, but arm a beats arm b by exactly 0.1 on every user: paired, the
    # interval is exactly 0.1 wide of nothing; unpaired it would straddle zero.
    b = {f"u{i}": i / 10 for i in range(10)}
    a = {u: s + 0.1 for u, s in b.items()}
    iv = paired_difference(a, b, seed=0)
    assert (iv.ci_low, iv.mean, iv.ci_high) == pytest.approx((0.1, 0.1, 0.1))


def test_paired_difference_uses_only_users_both_arms_scored():
    iv = paired_difference({"u1": 1.0, "u2": 0.0}, {"u1": 0.5}, seed=0)
    assert iv.mean == pytest.approx(0.5)


def test_one_user_has_no_interval_rather_than_a_certain_one():
    # Three different scores of one user: every draw of users is that user again, so a
    # percentile interval would be zero wide and read as certain; there is no interval.
    iv = mean_interval([0.2, 0.9, 0.4], ["u1", "u1", "u1"], seed=0)
    assert iv.mean == pytest.approx(0.5)
    assert np.isnan(iv.ci_low) and np.isnan(iv.ci_high)
    assert not iv.ci_low > 0   # a "significant" check cannot pass on one user
