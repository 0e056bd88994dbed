"""The verdict rule of ``mocolab reproduce``: does a claimed comparison hold over seeds? Pure numpy/scipy.

A check compares two quantities measured once per seed, ``a`` and ``b`` (``b`` may be a constant), through the
paired differences ``d = a - b``. Their mean gets a two-sided ``1 - 2 alpha`` Student-t confidence interval
``[low, high]`` (``n - 1`` degrees of freedom), so that each bound is a one-sided test at level ``alpha``. With
``margin`` >= 0 (in the metric's unit), the claim ``a RELATION b`` is

=========  ==========================  ==========================  ===============================
relation   claim                       reproduced when             not reproduced when
=========  ==========================  ==========================  ===============================
``>``      a beats b by > margin       low > margin                high < margin
``>=``     a is not below b - margin   low > -margin               high < -margin
``<=``     a is not above b + margin   high < margin               low > margin
``~``      \\|a - b\\| <= margin        -margin < low, high < margin  low > margin or high < -margin
=========  ==========================  ==========================  ===============================

and *inconclusive* otherwise: the interval straddles the threshold, so the seeds do not decide (``~`` is the
two one-sided tests of equivalence). Fewer than two pairs give no interval: inconclusive. A claim made of
several checks is reproduced when all are, not reproduced when any is not, else inconclusive.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not_reproduced", "inconclusive"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE)
RELATIONS = (">", ">=", "<=", "~")


@dataclass(frozen=True)
class Interval:
    """Mean of the paired differences and its ``1 - 2 alpha`` t interval (NaN bounds when ``n < 2``)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def defined(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high))


def paired_interval(a: Sequence[float], b: Sequence[float] | float, alpha: float = ALPHA) -> Interval:
    """The t confidence interval (two-sided, level ``1 - 2 alpha``) of ``mean(a - b)`` over pairs.

    ``a`` and ``b`` are aligned by position (one value per seed); ``b`` may be a scalar. ValueError when the
    lengths differ, a value is not finite, there is no pair, or ``alpha`` is not in (0, 0.5)."""
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha={alpha} must be in (0, 0.5)")
    a_arr = np.asarray(a, dtype=float)
    b_arr = np.full_like(a_arr, float(b)) if np.isscalar(b) else np.asarray(b, dtype=float)
    if a_arr.shape != b_arr.shape or a_arr.ndim != 1:
        raise ValueError(f"paired values need equal lengths: {a_arr.shape} vs {b_arr.shape}")
    if a_arr.size == 0:
        raise ValueError("no paired values: a check needs at least one seed measured on both sides")
    d = a_arr - b_arr
    if not np.all(np.isfinite(d)):
        raise ValueError(f"paired differences must be finite, got {d.tolist()}")
    n, mean = d.size, float(d.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    half = float(stats.t.ppf(1 - alpha, n - 1)) * float(d.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def decide(interval: Interval, relation: str, margin: float = 0.0) -> str:
    """The verdict of ``a RELATION b`` (with ``margin``) from the interval of ``a - b`` (module docstring)."""
    if relation not in RELATIONS:
        raise ValueError(f"relation {relation!r} is not one of {', '.join(RELATIONS)}")
    if margin < 0:
        raise ValueError(f"margin={margin} must be >= 0")
    if not interval.defined:
        return INCONCLUSIVE
    low, high = interval.low, interval.high
    if relation == ">":
        yes, no = low > margin, high < margin
    elif relation == ">=":
        yes, no = low > -margin, high < -margin
    elif relation == "<=":
        yes, no = high < margin, low > margin
    else:
        yes, no = -margin < low and high < margin, low > margin or high < -margin
    return REPRODUCED if yes else NOT_REPRODUCED if no else INCONCLUSIVE


def interval_sd(interval: Interval, alpha: float = ALPHA) -> float:
    """The standard deviation of the paired differences behind a defined ``interval`` (its half-width undone)."""
    return (interval.high - interval.low) / 2 * math.sqrt(interval.n) / float(stats.t.ppf(1 - alpha, interval.n - 1))


def seeds_needed(sd: float, distance: float, power: float = 0.8, alpha: float = ALPHA, most: int = 1000) -> int | None:
    """How many seeds resolve a check whose true mean difference lies ``distance`` from its threshold, with
    probability ``power``, when the paired differences have standard deviation ``sd``: the smallest n >= 2 with
    ``(t(1 - alpha, n - 1) + t(power, n - 1)) sd / sqrt(n) < distance`` (the one-sided t test's power rule). None
    when no n up to ``most`` does (or ``distance`` is 0)."""
    if distance <= 0:
        return None
    for n in range(2, most + 1):
        if (stats.t.ppf(1 - alpha, n - 1) + stats.t.ppf(power, n - 1)) * sd / math.sqrt(n) < distance:
            return n
    return None


def threshold(relation: str, margin: float, difference: float) -> float:
    """The value of ``a - b`` at which the verdict of ``a RELATION b`` turns (for ``~``, the bound nearer
    ``difference``)."""
    if relation == "~":
        return margin if difference >= 0 else -margin
    return -margin if relation == ">=" else margin


def combine(verdicts: Iterable[str]) -> str:
    """A claim's verdict from its checks': all reproduced -> reproduced; any not reproduced -> not reproduced."""
    verdicts = list(verdicts)
    if not verdicts:
        raise ValueError("a claim needs at least one check")
    unknown = set(verdicts) - set(VERDICTS)
    if unknown:
        raise ValueError(f"unknown verdicts {sorted(unknown)}; expected {VERDICTS}")
    if NOT_REPRODUCED in verdicts:
        return NOT_REPRODUCED
    return REPRODUCED if all(v == REPRODUCED for v in verdicts) else INCONCLUSIVE
