"""The worked example of platform/ARCHITECTURE.md holds: a mechanism is one module plus one registry line.

The module and the registry line are taken from the document itself, the module written to a temporary folder
(not into the package) and registered there; nothing else is changed before the step and the estimate run."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from mocolab.config import load_config
from mocolab.moco import mechanisms
from mocolab.moco.model import MoCo
from mocolab.reproduce import estimate
from mocolab.train.step import TrainStep, make_optimizer

ROOT = Path(__file__).resolve().parents[2]
SECTION = (ROOT / "platform" / "ARCHITECTURE.md").read_text().split("### Worked example: adding a mechanism")[1]
QUICKSTART = ROOT / "experiments" / "pretrain" / "quickstart.yaml"


@pytest.fixture
def example_registered(tmp_path, monkeypatch):
    """The section's module as ``two_queues.py`` on the path, and its registry line in ``MECHANISMS``."""
    code = re.search(r"```python\n(.*?)```", SECTION, re.S).group(1)
    name, target = re.search(r'`"(\w+)": "mocolab\.moco\.mechanisms\.(\w+:\w+)"`', SECTION).groups()
    (tmp_path / f"{target.partition(':')[0]}.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(mechanisms.MECHANISMS, name, target)
    return name


def _config(mechanism: str, **sets):
    overrides = [
        f"moco.mechanism={mechanism}",
        "model.bn=split",
        "model.bn_splits=1",
        "scaling.num_workers=1",
        "train.batch_size=8",
        "moco.queue_size=32",
        *(f"{k}={v}" for k, v in sets.items()),
    ]
    return load_config(QUICKSTART, overrides)


def test_the_documented_mechanism_trains_a_step_and_logs_its_k(example_registered):
    cfg = _config(example_registered)
    torch.manual_seed(0)
    model = MoCo.from_config(cfg, num_train_samples=64).train()
    size = cfg.data.image_size
    images = lambda: torch.randn(8, 3, size, size)  # noqa: E731
    queues = model.dictionary.queues.clone()
    out = model(images(), images(), torch.arange(8))
    assert out.logits.shape == (8, 1 + 2 * 32) and not out.labels.any()
    step = TrainStep(model, make_optimizer(model.parameters(), 0.03, 0.9, 1e-4), "off", "cpu")
    assert math.isfinite(float(step(images(), images(), torch.arange(8))))
    changed = (model.dictionary.queues != queues).any(dim=2).any(dim=1)
    assert changed.tolist() == [True, True] and int(model.dictionary.turn) == 0  # the queues took turns
    assert list(model.dictionary.pointers) == [8, 8]
    assert mechanisms.run_params(cfg) == {mechanisms.EFFECTIVE_K_PARAM: 64, mechanisms.NEGATIVES_PARAM: 64}


def test_reproduce_estimates_the_documented_mechanism_by_its_cost_factor(example_registered):
    def training_seconds(mechanism: str) -> float:
        return estimate.trial_seconds(_config(mechanism, **{"train.knn_every": 0}), 1000, 100)

    overhead = estimate.TRIAL_OVERHEAD_SECONDS
    cost = mechanisms.mechanism_class(example_registered).cost_factor
    assert cost != 1.0  # so that the comparison below can fail
    assert training_seconds(example_registered) - overhead == pytest.approx(
        cost * (training_seconds("moco") - overhead)
    )
