"""Killing Ray Train workers of this test session's Ray node at a known point of a run."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil

SNAPSHOT = "checkpoint_manager_snapshot.json"


def train_workers(ray_module) -> list[psutil.Process]:
    """The RayTrainWorker processes of this session's Ray node (not of other Ray instances on the machine)."""
    from ray._private import ray_constants

    node = ray_module._private.worker._global_node
    raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
    return [p for p in raylet.children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline())]


def registered_checkpoint(run_folder: Path) -> tuple[int, Path | None]:
    """``(epoch, folder)`` of the latest checkpoint Ray Train's controller has registered for the run in
    ``run_folder`` (what a restart resumes from; a checkpoint still on its way from a worker when it dies
    does not count); ``(0, None)`` before the first."""
    try:
        latest = json.loads((run_folder / SNAPSHOT).read_text()).get("latest_checkpoint_result") or {}
    except (OSError, ValueError):  # not written yet, or being replaced
        return 0, None
    if not latest:
        return 0, None
    return int(latest.get("metrics", {}).get("epoch", 0)), run_folder / latest["checkpoint_dir_name"]


def registered_checkpoints(run_folder: Path) -> list[Path]:
    """Every checkpoint folder Ray Train's controller keeps registered for the run, in report order."""
    snapshot = json.loads((run_folder / SNAPSHOT).read_text())
    return [run_folder / result["checkpoint_dir_name"] for result in snapshot["checkpoint_results"]]


def registered_epoch(run_folder: Path) -> int:
    """The epoch of :func:`registered_checkpoint`."""
    return registered_checkpoint(run_folder)[0]


def wait_for_registered_epoch(run_folder: Path, epoch: int, timeout_s: float) -> bool:
    """Poll until the run has registered the checkpoint of ``epoch`` (or a later one); False on timeout."""
    deadline = time.monotonic() + timeout_s
    while registered_epoch(run_folder) < epoch:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def kill_a_worker_after_checkpoint(
    ray_module, run_folder: Path, killed: dict[str, Any], epoch: int = 1, timeout_s: float = 600
) -> None:
    """Once the run's checkpoint of ``epoch`` is registered (the next epoch is then under way), SIGKILL one
    training worker; record its pid and the registered epoch in ``killed``."""
    if not wait_for_registered_epoch(run_folder, epoch, timeout_s):
        return
    workers = train_workers(ray_module)
    if workers:
        victim = workers[-1]
        killed["pid"] = victim.pid
        killed["registered_epoch"] = registered_epoch(run_folder)
        os.kill(victim.pid, signal.SIGKILL)
