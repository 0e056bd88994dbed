"""Learning-rate schedule of the pretraining loop (pure function, no Ray)."""

import math

import pytest

from mocolab.config import TrainConfig, build_config
from mocolab.train.schedule import lr_factor, momentum_schedule


def test_cosine_goes_from_one_to_zero_over_the_epochs():
    train = TrainConfig(epochs=10, schedule="cosine")
    assert lr_factor(0, 5, train) == 1.0
    assert lr_factor(25, 5, train) == pytest.approx(0.5)  # half-way: epoch 5 of 10
    assert lr_factor(49, 5, train) == pytest.approx(0.5 * (1 + math.cos(math.pi * 9.8 / 10)))
    assert lr_factor(50, 5, train) == pytest.approx(0.0)


def test_step_schedule_decays_at_each_milestone_epoch():
    train = TrainConfig(epochs=200, schedule="step", lr_milestones=[120, 160], lr_decay=0.1)
    assert lr_factor(119 * 10 + 9, 10, train) == 1.0
    assert lr_factor(120 * 10, 10, train) == pytest.approx(0.1)
    assert lr_factor(160 * 10, 10, train) == pytest.approx(0.01)


def test_linear_warmup_then_cosine_over_the_remaining_epochs():
    train = TrainConfig(epochs=12, schedule="cosine", warmup_epochs=2)
    assert lr_factor(0, 4, train) == pytest.approx(1 / 8)
    assert lr_factor(7, 4, train) == pytest.approx(1.0)
    assert lr_factor(8, 4, train) == pytest.approx(1.0)
    assert lr_factor(8 + 20, 4, train) == pytest.approx(0.5)  # epoch 7 = half of the 10 after warmup


def test_momentum_warm_up_then_the_constant_or_the_cosine_momentum():
    raw = {"moco": {"momentum": 0.9, "momentum_warmup_epochs": 2, "warmup_momentum": 0.99}, "train": {"epochs": 4}}
    momentum_at = momentum_schedule(build_config(raw), steps_per_epoch=5)
    assert [momentum_at(s) for s in (0, 9, 10, 19)] == [0.99, 0.99, 0.9, 0.9]
    raw["moco"]["momentum_schedule"] = "cosine"
    momentum_at = momentum_schedule(build_config(raw), steps_per_epoch=5)
    assert momentum_at(9) == 0.99 and momentum_at(10) == pytest.approx(1 - 0.5 * (1 + math.cos(math.pi / 2)) * 0.1)
    assert momentum_schedule(build_config({"moco": {"momentum": 0.9}}), steps_per_epoch=5) is None
