"""A Ray Train worker process killed mid-epoch: Ray Train restarts the worker group (train.max_failures)
from the last checkpoint, and the run ends in exactly the state of an uninterrupted run with the same
seed (queue, pointer, weights, optimizer, scheduler, epoch, RNG), in one MLflow run with every epoch.

(Killing the driver and relaunching under the same name is tests/train/test_pretrain_resume.py; a NaN loss
is tests/train/test_pretrain_ray.py; a crash while a checkpoint file is written is test_fault_checkpoint.py.)
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from fault_injection import kill_a_worker_after_checkpoint
from mlflow import MlflowClient

from mocolab.config import build_config
from mocolab.orchestrate import run_pretrain
from mocolab.train.checkpoint import CHECKPOINT_FILE, load_checkpoint

EPOCHS = 3


def deterministic_config(tmp_path: Path, run_name: str):
    """2 workers x 32 images on 1024 digits: 16 steps (a few seconds) an epoch, a checkpoint every epoch, no kNN."""
    raw = {
        "moco": {"version": "v2", "dim": 32, "queue_size": 1024, "momentum": 0.99, "temperature": 0.2},
        "model": {"arch": "small_cnn", "bn": "shuffle"},
        "data": {"dataset": "digits", "image_size": 24, "loader_workers": 0, "limit_train": 1024},
        "train": {
            "epochs": EPOCHS,
            "batch_size": 32,
            "lr": 0.03,
            "seed": 7,
            "deterministic": True,
            "knn_every": 0,
            "checkpoint_every": 1,
            "keep_checkpoints": EPOCHS,
            "max_failures": 1,
        },
        "scaling": {"num_workers": 2, "storage_path": str(tmp_path / "ray_results")},
        "tracking": {
            "experiment": "fault",
            "run_name": run_name,
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        },
    }
    return build_config(raw, base=tmp_path)


def checkpoints(cfg) -> list[Path]:
    """The run's checkpoint folders, oldest first (their names are timestamps)."""
    run_folder = Path(cfg.scaling.storage_path, cfg.tracking.run_name)
    return sorted(p.parent for p in run_folder.glob(f"checkpoint_*/{CHECKPOINT_FILE}"))


def comparable(value: Any) -> Any:
    """Checkpoint contents with tensors as lists: equal iff bit-identical."""
    if isinstance(value, torch.Tensor):
        return (str(value.dtype), value.tolist())
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [comparable(v) for v in value]
    return value


@pytest.mark.slow
def test_killed_worker_restarts_from_checkpoint_and_matches_an_uninterrupted_run(ray_local, mlflow_uri, tmp_path):
    reference_cfg = deterministic_config(tmp_path, "uninterrupted")
    reference_id = run_pretrain(reference_cfg)

    cfg = deterministic_config(tmp_path, "worker-killed")
    killed: dict[str, Any] = {}
    run_folder = Path(cfg.scaling.storage_path, cfg.tracking.run_name)
    killer = threading.Thread(target=kill_a_worker_after_checkpoint, args=(ray_local, run_folder, killed), daemon=True)
    killer.start()
    run_id = run_pretrain(cfg)
    killer.join(timeout=5)

    assert "pid" in killed, "no Ray Train worker was found to kill"
    assert not psutil.pid_exists(killed["pid"]) or psutil.Process(killed["pid"]).status() == psutil.STATUS_ZOMBIE
    assert killed["registered_epoch"] < EPOCHS, "the run had finished before the kill"

    client = MlflowClient(cfg.tracking.tracking_uri)
    experiment = client.get_experiment_by_name("fault")
    runs = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'worker-killed'")
    assert [r.info.run_id for r in runs] == [run_id]  # the restart logged into the same run
    assert runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert sorted(set(steps)) == list(range(1, EPOCHS + 1))  # continuous history
    assert steps.count(1) == 1  # epoch 1 was not trained again: the group resumed from its checkpoint

    state = load_checkpoint(checkpoints(cfg)[-1])
    reference = load_checkpoint(checkpoints(reference_cfg)[-1])
    assert (
        (state["epoch"], state["global_step"])
        == (reference["epoch"], reference["global_step"])
        == (EPOCHS, 16 * EPOCHS)
    )
    assert state["mlflow_run_id"] == run_id and reference["mlflow_run_id"] == reference_id
    queue_keys = [k for k in state["model"] if k.endswith(("queue", "queue_ptr"))]
    assert len(queue_keys) == 2
    for key in queue_keys:
        assert torch.equal(state["model"][key], reference["model"][key]), key
    assert comparable(state["model"]) == comparable(reference["model"])
    assert comparable(state["optimizer"]) == comparable(reference["optimizer"])
    assert comparable(state["scheduler"]) == comparable(reference["scheduler"])
    assert comparable(state["rng"]) == comparable(reference["rng"])
    reference_losses = [m.value for m in client.get_metric_history(reference_id, "loss")]
    losses = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert [losses[step] for step in range(1, EPOCHS + 1)] == reference_losses
