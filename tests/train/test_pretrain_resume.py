"""Kill a real ``mocolab pretrain`` mid-run (SIGKILL to its process group: driver and its local Ray) and
start it again under the same name: it resumes from its last checkpoint, in the same MLflow run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from mocolab.config import load_config
from mocolab.orchestrate import run_pretrain
from mocolab.train.checkpoint import load_checkpoint

EPOCHS = 8
STEPS_PER_EPOCH = 4  # 256 images / (2 workers x 32)
KEYS_PER_EPOCH = STEPS_PER_EPOCH * 64
QUEUE = 2048


def write_config(tmp_path: Path) -> Path:
    raw = {
        "moco": {"version": "v2", "dim": 32, "queue_size": QUEUE, "momentum": 0.99, "temperature": 0.2},
        "model": {"arch": "small_cnn", "bn": "shuffle"},
        "data": {"dataset": "digits", "image_size": 24, "loader_workers": 0, "limit_train": 256, "limit_test": 100},
        "train": {"epochs": EPOCHS, "batch_size": 32, "lr": 0.03, "knn_k": 10, "keep_checkpoints": EPOCHS + 2},
        "scaling": {"num_workers": 2, "storage_path": "ray_results"},
        "tracking": {"experiment": "resume", "run_name": "killed-run", "tracking_uri": "sqlite:///mlflow.db"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def logged_epochs(client: MlflowClient) -> tuple[str, list[int]]:
    exp = client.get_experiment_by_name("resume")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    if not runs:
        return "", []
    run_id = runs[0].info.run_id
    return run_id, [m.step for m in client.get_metric_history(run_id, "loss")]


def checkpoint_dirs(storage: Path) -> set[Path]:
    return {p for p in storage.glob("checkpoint_*") if p.is_dir()}


def queue_of(state: dict) -> tuple[torch.Tensor, int]:
    (queue_key,) = [k for k in state["model"] if k.endswith("queue")]
    (ptr_key,) = [k for k in state["model"] if k.endswith("queue_ptr")]
    return state["model"][queue_key], int(state["model"][ptr_key])


@pytest.mark.slow
def test_killed_run_resumes_with_its_queue_in_the_same_mlflow_run(ray_local, mlflow_uri, tmp_path):
    config_path = write_config(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    first = subprocess.Popen(
        [sys.executable, "-m", "mocolab.cli", "pretrain", str(config_path)],
        cwd=tmp_path,
        env=env,
        start_new_session=True,  # its own process group: the driver and the Ray it starts
        stdout=open(tmp_path / "first.log", "w"),
        stderr=subprocess.STDOUT,
    )
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    deadline = time.monotonic() + 420
    try:
        while True:
            time.sleep(0.5)
            try:
                run_id, epochs = logged_epochs(client)
            except Exception:  # the store is being created by the child
                run_id, epochs = "", []
            if len(epochs) >= 2 or first.poll() is not None or time.monotonic() > deadline:
                break
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert len(epochs) >= 2, (tmp_path / "first.log").read_text()[-3000:]
    assert max(epochs) < EPOCHS, "the first launch finished before it could be killed"
    assert client.get_run(run_id).info.status == "RUNNING"  # killed: no chance to mark it

    storage = tmp_path / "ray_results" / "killed-run"
    before_kill = checkpoint_dirs(storage)

    cfg = load_config(config_path)  # same name: resumes
    assert run_pretrain(cfg) == run_id

    runs = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert sorted(set(steps)) == list(range(1, EPOCHS + 1))  # continuous: every epoch is there

    # The resumed run's first checkpoint continues the queue of the checkpoint it resumed from:
    # exactly one epoch of keys was written after the saved pointer; every other row is the saved one.
    old = {s["epoch"]: s for s in map(load_checkpoint, before_kill)}
    new = {s["epoch"]: s for s in map(load_checkpoint, checkpoint_dirs(storage) - before_kill)}
    resumed_from = min(new) - 1
    assert sorted(new) == list(range(resumed_from + 1, EPOCHS + 1))
    # Only the epochs re-run after the checkpoint it resumed from (the last one Ray had registered) are logged
    # twice: those logged before the kill, and the one in flight when it came.
    logged_twice = {step for step in steps if steps.count(step) > 1}
    assert logged_twice <= set(range(resumed_from + 1, max(epochs) + 2)), (logged_twice, resumed_from, epochs)
    saved, after = old[resumed_from], new[resumed_from + 1]
    saved_queue, saved_ptr = queue_of(saved)
    queue, ptr = queue_of(after)
    assert ptr == (saved_ptr + KEYS_PER_EPOCH) % QUEUE
    written = torch.zeros(QUEUE, dtype=torch.bool)
    written[(saved_ptr + torch.arange(KEYS_PER_EPOCH)) % QUEUE] = True
    assert torch.equal(queue[~written], saved_queue[~written])
    assert not torch.equal(queue[written], saved_queue[written])
    assert after["global_step"] == saved["global_step"] + STEPS_PER_EPOCH
    assert after["scheduler"]["last_epoch"] == after["global_step"]
    assert saved_ptr == (resumed_from * KEYS_PER_EPOCH) % QUEUE
