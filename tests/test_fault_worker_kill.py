"""A Ray Train worker process killed mid-epoch: Ray Train restarts the worker group (train.max_failures)
from the last checkpoint, and the run ends in exactly the state of an uninterrupted run with the same
seed (queue, pointer, weights, optimizer, scheduler, epoch, RNG), in one MLflow run with every epoch.

(Killing the driver and relaunching under the same name is tests/test_pretrain_resume.py; a NaN loss
is tests/test_pretrain_ray.py; a crash while a checkpoint file is written is test_fault_checkpoint.py.)
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from mlflow import MlflowClient

from mocolab.config import build_config
from mocolab.train.checkpoint import CHECKPOINT_FILE, load_checkpoint
from mocolab.train.launch import run_pretrain

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
        "tracking": {"experiment": "fault", "run_name": run_name, "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    return build_config(raw, base=tmp_path)


def checkpoints(cfg) -> list[Path]:
    """The run's checkpoint folders, oldest first (their names are timestamps)."""
    run_folder = Path(cfg.scaling.storage_path, cfg.tracking.run_name)
    return sorted(p.parent for p in run_folder.glob(f"checkpoint_*/{CHECKPOINT_FILE}"))


def train_workers(ray_module) -> list[psutil.Process]:
    """The RayTrainWorker processes of this session's Ray node (not of other Ray instances on the machine)."""
    from ray._private import ray_constants

    node = ray_module._private.worker._global_node
    raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
    return [p for p in raylet.children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline())]


def registered_epoch(cfg) -> int:
    """The epoch of the latest checkpoint Ray Train's controller has registered (what a restart resumes
    from; a checkpoint still on its way from the worker when it dies does not count)."""
    snapshot = Path(cfg.scaling.storage_path, cfg.tracking.run_name, "checkpoint_manager_snapshot.json")
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
    except (OSError, ValueError):  # not written yet, or being replaced
        return 0
    return int(latest.get("metrics", {}).get("epoch", 0))


def kill_a_worker_after_first_checkpoint(ray_module, cfg, killed: dict[str, Any], timeout_s: float = 600) -> None:
    """Once the epoch-1 checkpoint is registered (epoch 2 is then under way), SIGKILL one training worker."""
    deadline = time.monotonic() + timeout_s
    while registered_epoch(cfg) < 1:
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)
    workers = train_workers(ray_module)
    if workers:
        victim = workers[-1]
        killed["pid"] = victim.pid
        killed["registered_epoch"] = registered_epoch(cfg)
        os.kill(victim.pid, signal.SIGKILL)


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
    killer = threading.Thread(target=kill_a_worker_after_first_checkpoint, args=(ray_local, cfg, killed), daemon=True)
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
    assert (state["epoch"], state["global_step"]) == (reference["epoch"], reference["global_step"]) == (EPOCHS, 16 * EPOCHS)
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
