"""A whole node lost mid-epoch (issue 11, "A lost node, not just a lost process").

A real 2-node Ray cluster on this machine (tests/support/local_cluster.py): a head and a second node, 1 CPU and one
``train_slot`` each; the run's two workers ask for one ``train_slot`` each (``scaling.resources_per_worker``),
so one runs on each node and shuffle-BN's all-gather crosses nodes. Both nodes use one storage folder. Once
a checkpoint is registered, the second node is SIGKILLed mid-epoch (its raylet, agents and training worker
at once) and a replacement node with the same resource is started: Ray Train (``train.max_failures=1``)
restarts the worker group on the head and the new node, from the last registered checkpoint, and the run
finishes in the same MLflow run with its epoch counter, queue and pointer carried over.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from fault_injection import registered_checkpoint, registered_checkpoints, wait_for_registered_epoch
from local_cluster import local_cluster
from local_servers import stop_session
from mlflow import MlflowClient

from mocolab.train.checkpoint import load_checkpoint

EPOCHS = 4
STEPS_PER_EPOCH = 8  # 512 images / (2 workers x 32)
KEYS_PER_EPOCH = STEPS_PER_EPOCH * 64
QUEUE = 2048  # > KEYS_PER_EPOCH: every epoch leaves the pointer somewhere else
SLOT = {"train_slot": 1}


def write_config(folder: Path) -> Path:
    raw = {
        "moco": {"version": "v2", "dim": 32, "queue_size": QUEUE, "momentum": 0.99, "temperature": 0.2},
        "model": {"arch": "small_cnn", "bn": "shuffle"},
        "data": {"dataset": "digits", "image_size": 24, "loader_workers": 0, "limit_train": 512},
        "train": {
            "epochs": EPOCHS,
            "batch_size": 32,
            "lr": 0.03,
            "knn_every": 0,
            "keep_checkpoints": EPOCHS + 2,
            "max_failures": 1,
        },  # fmt: skip
        "scaling": {"num_workers": 2, "storage_path": str(folder / "ray_results"), "resources_per_worker": SLOT},
        "tracking": {
            "experiment": "node-loss",
            "run_name": "node-lost",
            "tracking_uri": f"sqlite:///{folder / 'mlflow.db'}",
        },  # fmt: skip
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def is_train_worker(proc) -> bool:
    try:
        return "RayTrainWorker" in " ".join(proc.cmdline())
    except Exception:  # gone meanwhile
        return False


def watch_for_train_worker(cluster, node, done, seen: threading.Event) -> None:
    """Set ``seen`` once a training worker runs on ``node``; stop when ``done()``."""
    while not done() and not seen.is_set():
        if any(is_train_worker(p) for p in cluster.processes(node)):
            seen.set()
        time.sleep(0.5)


def queue_of(state: dict) -> tuple[torch.Tensor, int]:
    (queue_key,) = [k for k in state["model"] if k.endswith("queue")]
    (ptr_key,) = [k for k in state["model"] if k.endswith("queue_ptr")]
    return state["model"][queue_key], int(state["model"][ptr_key])


def mark(started: float, event: str) -> None:
    """A timeline line (shown with the output of a failed test)."""
    print(f"[node-loss] {time.monotonic() - started:6.1f} s  {event}", flush=True)


@pytest.mark.slow
def test_run_survives_losing_a_node_mid_epoch():
    started = time.monotonic()
    with local_cluster() as cluster:
        cluster.add_node(num_cpus=1, resources=SLOT)  # the head: driver, Train controller, one worker
        second = cluster.add_node(num_cpus=1, resources=SLOT)
        mark(started, "2 nodes up; driver starting")
        config = write_config(cluster.folder)
        run_folder = cluster.folder / "ray_results" / "node-lost"
        driver_log = cluster.folder / "driver.log"
        driver = subprocess.Popen(
            [sys.executable, "-m", "mocolab.cli", "pretrain", str(config)],
            cwd=cluster.folder, env={**cluster.env, "RAY_ADDRESS": cluster.address},
            start_new_session=True, stdout=open(driver_log, "wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            assert wait_for_registered_epoch(run_folder, 1, timeout_s=300), driver_log.read_text()[-4000:]
            mark(started, "epoch-1 checkpoint registered")
            on_second = [p for p in cluster.processes(second) if is_train_worker(p)]
            time.sleep(1.0)  # into the next epoch (an epoch takes a few seconds)
            victims = cluster.kill_node(second)
            resumed_from, saved_dir = registered_checkpoint(run_folder)
            mark(started, f"second node killed ({len(victims)} processes); registered checkpoint: epoch {resumed_from}")
            replacement = cluster.add_node(num_cpus=1, resources=SLOT)
            mark(started, "replacement node up")
            ran_on_replacement = threading.Event()
            threading.Thread(
                target=watch_for_train_worker,
                args=(cluster, replacement, lambda: driver.poll() is not None, ran_on_replacement),
                daemon=True,
            ).start()
            driver.wait(timeout=420)
            mark(started, f"driver exited ({driver.returncode})")
        finally:
            stop_session(driver, 10)
        log = driver_log.read_text(errors="replace")
        assert driver.returncode == 0, log[-6000:]

        assert on_second, f"no training worker ran on the second node (workers not on both nodes)\n{log[-6000:]}"
        assert {p.pid for p in on_second} <= {p.pid for p in victims}
        assert 1 <= resumed_from < EPOCHS, "the run had finished before the node was lost"
        global_step = resumed_from * STEPS_PER_EPOCH
        assert f"resumed from epoch {resumed_from} (global step {global_step})" in log, log[-6000:]
        assert ran_on_replacement.is_set(), "the restarted worker group did not use the replacement node"

        client = MlflowClient(f"sqlite:///{cluster.folder / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("node-loss").experiment_id])
        assert [r.info.run_name for r in runs] == ["node-lost"] and runs[0].info.status == "FINISHED"
        run_id = runs[0].info.run_id
        steps = [m.step for m in client.get_metric_history(run_id, "loss")]
        assert sorted(set(steps)) == list(range(1, EPOCHS + 1))  # every epoch logged
        assert all(steps.count(epoch) == 1 for epoch in range(1, resumed_from + 1))  # none up to the checkpoint again

        saved = load_checkpoint(saved_dir)
        assert saved["epoch"] == resumed_from and saved["mlflow_run_id"] == run_id
        registered = [load_checkpoint(folder) for folder in registered_checkpoints(run_folder)]
        assert [state["epoch"] for state in registered] == list(range(1, EPOCHS + 1))  # one per epoch, in order
        after = {state["epoch"]: state for state in registered if state["epoch"] > resumed_from}
        assert after[EPOCHS]["mlflow_run_id"] == run_id
        # The restarted group's first epoch continued the saved queue: exactly one epoch of keys after the saved
        # pointer, every other row the saved one (a fresh start, or one from another checkpoint, cannot give this).
        first = after[resumed_from + 1]
        saved_queue, saved_ptr = queue_of(saved)
        queue, ptr = queue_of(first)
        assert saved_ptr == global_step * 64 % QUEUE and ptr == (saved_ptr + KEYS_PER_EPOCH) % QUEUE
        written = torch.zeros(QUEUE, dtype=torch.bool)
        written[(saved_ptr + torch.arange(KEYS_PER_EPOCH)) % QUEUE] = True
        assert torch.equal(queue[~written], saved_queue[~written])
        assert not torch.equal(queue[written], saved_queue[written])
        assert first["global_step"] == saved["global_step"] + STEPS_PER_EPOCH
