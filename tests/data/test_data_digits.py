"""The made digits task: deterministic, split by digit image, shapes and value range."""

from __future__ import annotations

import numpy as np
import pytest

from mocolab.config import DigitsConfig
from mocolab.data.digits import digits_split, place_digits

SMALL = DigitsConfig(canvas=20, min_scale=1.0, max_scale=2.0, copies=2, test_fraction=0.25, seed=3)


def test_shapes_dtypes_and_sizes():
    train_x, train_y = digits_split(SMALL, "train")
    test_x, test_y = digits_split(SMALL, "test")
    assert train_x.shape[1:] == (20, 20, 3) and train_x.dtype == np.uint8
    assert train_y.dtype == np.int64 and set(np.unique(train_y)) == set(range(10))
    assert len(test_y) == pytest.approx(0.25 * 1797, abs=1)
    assert len(train_y) == 2 * (1797 - len(test_y))
    assert (train_x[..., 0] == train_x[..., 2]).all()  # white on black: grey replicated to RGB
    assert train_x.reshape(len(train_x), -1).max(axis=1).min() > 100  # every canvas shows its digit


def test_deterministic_given_the_seed_and_different_across_seeds():
    again = DigitsConfig(**SMALL.model_dump())
    from mocolab.data import digits

    first = digits_split(SMALL, "train")[0].copy()
    digits._make_task.cache_clear()
    assert np.array_equal(first, digits_split(again, "train")[0])
    other = DigitsConfig(**{**SMALL.model_dump(), "seed": 4})
    assert not np.array_equal(first, digits_split(other, "train")[0])


def test_train_and_test_hold_different_digit_images():
    """Scaled back to 8x8 each placement is its source digit; no test digit appears in training."""
    cfg = DigitsConfig(canvas=8, min_scale=1.0, max_scale=1.0, copies=1, seed=0)
    train = {row.tobytes() for row in digits_split(cfg, "train")[0]}
    test = {row.tobytes() for row in digits_split(cfg, "test")[0]}
    assert len(train) > 1000 and len(test) > 400
    assert not train & test


def test_copies_place_each_training_digit_differently():
    x, _ = digits_split(SMALL, "train")
    half = len(x) // 2
    assert (x[:half] != x[half:]).reshape(half, -1).any(axis=1).mean() > 0.9


def test_test_split_does_not_depend_on_copies():
    more = DigitsConfig(**{**SMALL.model_dump(), "copies": 3})
    assert np.array_equal(digits_split(SMALL, "test")[0], digits_split(more, "test")[0])


def test_arrays_are_read_only():
    x, y = digits_split(SMALL, "train")
    with pytest.raises(ValueError):
        x[0, 0, 0, 0] = 1


def test_place_digits_scales_within_bounds():
    digit = np.full((1, 8, 8), 16.0, dtype=np.float32)
    out = place_digits(digit, canvas=30, min_scale=3.0, max_scale=3.0, rng=np.random.default_rng(0))
    assert (out[0, ..., 0] > 0).sum() == 24 * 24


@pytest.mark.parametrize(
    "change, field", [({"max_scale": 4.0}, "data.digits.max_scale"), ({"min_scale": 3.0}, "data.digits.min_scale")]
)
def test_digits_that_do_not_fit_are_refused(change, field):
    with pytest.raises(ValueError, match=field):
        DigitsConfig(**{**SMALL.model_dump(), **change})  # a pure rule of the schema


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="val"):
        digits_split(SMALL, "val")
