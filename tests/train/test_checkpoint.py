"""Checkpoint files: weights_only round trip, RNG states, atomic replacement."""

import random

import numpy as np
import pytest
import torch

from mocolab.train import checkpoint as ckpt


def _state(value: float) -> dict:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    return {
        "model": {"queue": torch.full((4, 2), value), "queue_ptr": torch.tensor([3])},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "epoch": 5,
        "global_step": 50,
        "rng": [ckpt.capture_rng_state()],
        "mlflow_run_id": "abc123",
        "config": {"moco": {"temperature": 0.2}, "model": {"arch": "small_cnn"}},
    }


def test_round_trip_loads_with_weights_only(tmp_path):
    state = _state(1.5)
    path = ckpt.save_checkpoint(tmp_path, state)
    assert path == tmp_path / ckpt.CHECKPOINT_FILE
    loaded = torch.load(path, weights_only=True)  # the contract: safe loading works
    assert torch.equal(loaded["model"]["queue"], state["model"]["queue"])
    assert loaded["optimizer"]["state"][0]["momentum_buffer"].shape == (2, 3)
    assert loaded["scheduler"]["last_epoch"] == 0
    assert (loaded["epoch"], loaded["global_step"], loaded["mlflow_run_id"]) == (5, 50, "abc123")
    assert ckpt.load_checkpoint(tmp_path)["config"] == state["config"]


def test_rng_state_restores_all_generators(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    ckpt.save_checkpoint(tmp_path, {"rng": ckpt.capture_rng_state()})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    ckpt.restore_rng_state(ckpt.load_checkpoint(tmp_path)["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1])
    assert got[2] == expected[2]


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, _state(1.0))

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, _state(2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.CHECKPOINT_FILE]  # no temporary left behind
    assert torch.equal(ckpt.load_checkpoint(tmp_path)["model"]["queue"], torch.full((4, 2), 1.0))


def test_missing_checkpoint_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        ckpt.load_checkpoint(tmp_path)
