"""Choosing the checkpoint a resumed run loads, without a Ray cluster: the order, the fallback, the messages.
(The end-to-end case, a truncated checkpoint under a real relaunch, is test_fault_truncated_checkpoint.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import ray.train
import torch

from mocolab.train.checkpoint import CHECKPOINT_FILE, save_checkpoint
from mocolab.train.resume import NoLoadableCheckpointError, Resumed, first_loadable, load_for_resume, resume_order


def test_order_is_latest_first_then_newest_epoch_first():
    reported = [("e1", 1), ("e2", 2), ("e3", 3), ("e2-again", 2), ("old", None)]
    assert resume_order("e3", reported) == ["e3", "e2-again", "e2", "e1", "old"]


def test_order_keeps_ray_latest_first_even_with_a_higher_epoch_elsewhere():
    # After a fallback to epoch 1, the run's new epoch-2 checkpoint is Ray's latest; the broken epoch 3 stays listed.
    assert resume_order("e2-new", [("e1", 1), ("e3-broken", 3), ("e2-new", 2)]) == ["e2-new", "e3-broken", "e1"]


def test_order_of_a_run_with_one_checkpoint():
    assert resume_order("only", [("only", 4)]) == ["only"]


def broken_unless(good: set[str]):
    def load(name: str) -> dict:
        if name not in good:
            raise RuntimeError(f"PytorchStreamReader failed reading {name}\nmore detail")
        return {"epoch": int(name[-1]), "global_step": 8}

    return load


def test_first_loadable_returns_the_first_that_loads_and_what_failed_before_it():
    chosen, state, skipped = first_loadable(["e3", "e2", "e1"], broken_unless({"e2", "e1"}), name=lambda c: f"/r/{c}")
    assert (chosen, state["epoch"]) == ("e2", 2)
    assert skipped == [("/r/e3", "RuntimeError: PytorchStreamReader failed reading e3")]  # first line only


def test_no_loadable_checkpoint_names_every_file_newest_first_and_the_fix():
    with pytest.raises(NoLoadableCheckpointError) as err:
        first_loadable(["e2", "e1"], broken_unless(set()), name=lambda c: f"/runs/r/{c}/checkpoint.pt")
    message = str(err.value)
    assert message.index("/runs/r/e2/checkpoint.pt: RuntimeError") < message.index("/runs/r/e1/checkpoint.pt")
    assert "2 checkpoint(s)" in message and "--set tracking.run_name=" in message and "good copy" in message
    assert "Traceback" not in message and "more detail" not in message


def test_fallback_note_names_the_bad_file_and_the_epoch_resumed_from():
    assert Resumed({"epoch": 3}, "/r/c3").fallback_note() is None
    note = Resumed({"epoch": 1}, "/r/c1", [("/r/c2/checkpoint.pt", "RuntimeError: truncated")]).fallback_note()
    assert note == "could not load /r/c2/checkpoint.pt (RuntimeError: truncated); resumed from epoch 1 (/r/c1)"


def write(folder: Path, epoch: int) -> ray.train.Checkpoint:
    queue = torch.full((8, 4), float(epoch))
    save_checkpoint(folder, {"epoch": epoch, "global_step": 4 * epoch, "model": {"queue": queue}})
    return ray.train.Checkpoint.from_directory(folder)


class Reported:
    """What ray.train.get_all_reported_checkpoints() returns: its own Checkpoint objects, metrics as reported."""

    def __init__(self, checkpoint, epoch):
        self.checkpoint = ray.train.Checkpoint(checkpoint.path, filesystem=checkpoint.filesystem)
        self.metrics = {"epoch": epoch, "loss": 1.0}


def ray_reports(monkeypatch, *checkpoints) -> None:
    """Ray Train's list of the run's registered checkpoints: ``checkpoints`` reported at epochs 1, 2, ..."""
    reported = [Reported(checkpoint, epoch) for epoch, checkpoint in enumerate(checkpoints, start=1)]
    monkeypatch.setattr(ray.train, "get_all_reported_checkpoints", lambda **_: reported)


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, monkeypatch):
    first, second = write(tmp_path / "checkpoint_a", 1), write(tmp_path / "checkpoint_b", 2)
    broken = tmp_path / "checkpoint_b" / CHECKPOINT_FILE
    broken.write_bytes(broken.read_bytes()[:100])
    ray_reports(monkeypatch, first, second)

    resumed = load_for_resume(second, rank=0, world_size=1, map_location=torch.device("cpu"))
    assert resumed.state["epoch"] == 1 and resumed.path == first.path
    assert torch.equal(resumed.state["model"]["queue"], torch.full((8, 4), 1.0))
    ((path, reason),) = resumed.skipped
    assert path == str(broken) and reason.startswith("RuntimeError: PytorchStreamReader failed")


def test_an_intact_latest_checkpoint_is_loaded_without_a_fallback(tmp_path, monkeypatch):
    first, second = write(tmp_path / "checkpoint_a", 1), write(tmp_path / "checkpoint_b", 2)
    ray_reports(monkeypatch, first, second)
    resumed = load_for_resume(second, rank=0, world_size=1, map_location=torch.device("cpu"))
    assert (resumed.state["epoch"], resumed.path, resumed.skipped) == (2, second.path, [])


def test_a_checkpoint_that_would_run_code_is_refused_like_a_broken_one(tmp_path, monkeypatch):
    """weights_only=True stays on: a pickled object of any other class does not load, and is named."""
    first = write(tmp_path / "checkpoint_a", 1)
    tampered = tmp_path / "checkpoint_b"
    tampered.mkdir()
    torch.save({"epoch": 2, "payload": Path("/etc")}, tampered / CHECKPOINT_FILE)
    second = ray.train.Checkpoint.from_directory(tampered)
    ray_reports(monkeypatch, first, second)
    resumed = load_for_resume(second, rank=0, world_size=1, map_location=torch.device("cpu"))
    assert resumed.state["epoch"] == 1
    ((path, reason),) = resumed.skipped
    assert path == str(tampered / CHECKPOINT_FILE)
    assert reason.startswith("refused by torch.load(weights_only=True): Unsupported global: GLOBAL pathlib.PosixPath")
