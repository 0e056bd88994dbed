"""The verdict rule of ``mocolab reproduce`` on synthetic numbers (no Ray, no MLflow)."""

import math

import numpy as np
import pytest
from scipy import stats

from mocolab.analysis.verdict import (
    INCONCLUSIVE,
    NOT_REPRODUCED,
    REPRODUCED,
    Interval,
    combine,
    decide,
    interval_sd,
    paired_interval,
    seeds_needed,
    threshold,
)


def test_interval_matches_the_t_formula_by_hand():
    # d = [2, 3, 4]: mean 3, sample std 1, t(0.95, df=2) = 2.919986 -> half width 2.919986 / sqrt(3)
    iv = paired_interval([3.0, 4.0, 5.0], [1.0, 1.0, 1.0])
    half = 2.919986 / math.sqrt(3)
    assert iv.n == 3 and iv.mean == pytest.approx(3.0)
    assert iv.low == pytest.approx(3.0 - half, abs=1e-5) and iv.high == pytest.approx(3.0 + half, abs=1e-5)


def test_interval_is_paired_not_pooled():
    # a large seed effect shared by both sides cancels in the differences
    a = [10.0, 50.0, 90.0]
    b = [9.0, 49.1, 88.9]
    iv = paired_interval(a, b)
    assert iv.low > 0.5 and iv.high < 1.5


def test_scalar_right_side_and_alpha():
    narrow = paired_interval([1.0, 2.0, 3.0, 4.0], 0.0, alpha=0.25)
    wide = paired_interval([1.0, 2.0, 3.0, 4.0], 0.0, alpha=0.01)
    assert narrow.mean == wide.mean == pytest.approx(2.5)
    assert wide.low < narrow.low < narrow.high < wide.high


def test_one_pair_gives_no_interval_and_no_verdict():
    iv = paired_interval([5.0], [1.0])
    assert not iv.defined and iv.mean == 4.0
    assert decide(iv, ">") == INCONCLUSIVE


@pytest.mark.parametrize(
    "a, b, message",
    [([1.0, 2.0], [1.0], "equal lengths"), ([], [], "no paired values"), ([1.0, float("nan")], [0.0, 0.0], "finite")],
)
def test_bad_inputs_are_refused(a, b, message):
    with pytest.raises(ValueError, match=message):
        paired_interval(a, b)


def test_bad_alpha_relation_margin_are_refused():
    with pytest.raises(ValueError, match="alpha"):
        paired_interval([1.0, 2.0], 0.0, alpha=0.5)
    iv = Interval(1.0, 0.5, 1.5, 3)
    with pytest.raises(ValueError, match="relation"):
        decide(iv, "==")
    with pytest.raises(ValueError, match="margin"):
        decide(iv, ">", margin=-1)


@pytest.mark.parametrize(
    "low, high, relation, margin, expected",
    [
        (0.5, 2.0, ">", 0.0, REPRODUCED),
        (-0.5, 2.0, ">", 0.0, INCONCLUSIVE),
        (-2.0, -0.5, ">", 0.0, NOT_REPRODUCED),
        (0.5, 2.0, ">", 1.0, INCONCLUSIVE),  # beats b, but not surely by the margin
        (-1.5, 3.0, ">=", 2.0, REPRODUCED),  # holds: not 2 below
        (-3.0, 1.0, ">=", 2.0, INCONCLUSIVE),
        (-5.0, -2.5, ">=", 2.0, NOT_REPRODUCED),
        (-4.0, 1.5, "<=", 2.0, REPRODUCED),
        (1.0, 3.0, "<=", 2.0, INCONCLUSIVE),
        (2.5, 6.0, "<=", 2.0, NOT_REPRODUCED),
        (-1.0, 1.5, "~", 2.0, REPRODUCED),
        (-1.0, 2.5, "~", 2.0, INCONCLUSIVE),
        (2.1, 4.0, "~", 2.0, NOT_REPRODUCED),
        (-4.0, -2.1, "~", 2.0, NOT_REPRODUCED),
    ],
)
def test_decide_table(low, high, relation, margin, expected):
    assert decide(Interval((low + high) / 2, low, high, 3), relation, margin) == expected


def test_three_noisy_seeds_decide_only_clear_effects():
    rng = np.random.default_rng(0)
    base = rng.normal(60, 3, size=3)
    noise = lambda: rng.normal(0, 1.0, size=3)  # noqa: E731
    assert decide(paired_interval(base + 10 + noise(), base), ">") == REPRODUCED
    assert decide(paired_interval(base - 10 + noise(), base), ">") == NOT_REPRODUCED
    assert decide(paired_interval(base + noise(), base + noise()), ">") == INCONCLUSIVE


def test_false_reproduction_rate_is_alpha():
    # with no true effect, ">" is declared reproduced in ~alpha of the experiments (one-sided t test)
    rng = np.random.default_rng(1)
    trials = 4000
    hits = sum(decide(paired_interval(rng.normal(0, 1, size=3), 0.0), ">") == REPRODUCED for _ in range(trials))
    assert 0.04 < hits / trials < 0.06


def test_equivalence_needs_enough_precision():
    # identical means, but three noisy seeds cannot show |a - b| < 0.5: inconclusive, not reproduced
    rng = np.random.default_rng(2)
    a, b = rng.normal(0, 2, size=3), rng.normal(0, 2, size=3)
    assert decide(paired_interval(a, b), "~", margin=0.5) == INCONCLUSIVE
    many = rng.normal(0, 0.2, size=50)
    assert decide(paired_interval(many, 0.0), "~", margin=0.5) == REPRODUCED


def test_combine():
    assert combine([REPRODUCED, REPRODUCED]) == REPRODUCED
    assert combine([REPRODUCED, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine([INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED]) == NOT_REPRODUCED
    with pytest.raises(ValueError, match="at least one"):
        combine([])
    with pytest.raises(ValueError, match="unknown"):
        combine(["maybe"])


def test_seeds_needed_follows_the_power_rule_and_the_interval_gives_back_its_sd():
    n = seeds_needed(sd=1.0, distance=1.0)
    power_rule = lambda k: (stats.t.ppf(0.95, k - 1) + stats.t.ppf(0.8, k - 1)) / math.sqrt(k)  # noqa: E731
    assert power_rule(n) < 1.0 <= power_rule(n - 1) and n == 8  # the normal approximation says ~6.2
    assert seeds_needed(1.0, 0.0) is None and seeds_needed(1.0, 0.01) is None  # beyond 1000 seeds
    d = [1.0, 2.5, 0.5, 3.0]
    assert interval_sd(paired_interval(d, 0.0)) == pytest.approx(float(np.std(d, ddof=1)))
    assert threshold(">", 2.0, 5.0) == 2.0 and threshold(">=", 2.0, 5.0) == -2.0 and threshold("~", 2.0, -1.0) == -2.0
