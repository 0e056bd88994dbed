"""Pretraining checkpoints: one ``checkpoint.pt`` dict that ``torch.load(weights_only=True)`` accepts.

Contents (see ARCHITECTURE.md): ``model`` (MoCo state_dict: both encoders, heads, queue and pointer or
bank), ``optimizer``, ``scheduler``, ``epoch`` (completed epochs), ``global_step``, ``rng`` (one entry per
worker rank: torch state as a tensor, numpy and python states as plain lists), ``mlflow_run_id`` and
``config``. The file is written under a temporary name and renamed, so a crash during a save never
leaves a checkpoint that cannot load. Ray keeps the last ``train.keep_checkpoints`` of them
(``CheckpointConfig(num_to_keep=...)``, see ``train/launch.py``).
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mocolab import tracking
from mocolab.runtime import seed_everything
from mocolab.train.step import TrainStep

CHECKPOINT_FILE = "checkpoint.pt"
BACKBONE_FILE = "backbone.pt"


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``directory/checkpoint.pt`` atomically (temporary file + ``os.replace``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / CHECKPOINT_FILE
    fd, tmp_name = tempfile.mkstemp(prefix=f".{CHECKPOINT_FILE}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load ``directory/checkpoint.pt`` with ``weights_only=True`` (no arbitrary code runs)."""
    path = Path(directory) / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CHECKPOINT_FILE} in checkpoint directory {directory}")
    return torch.load(path, map_location=map_location, weights_only=True)


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states in ``weights_only``-loadable form (torch: tensor; numpy, python: lists)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_version, list(py_internal), py_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def gather_rng_states(world_size: int) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (a collective: all ranks call it)."""
    state = capture_rng_state()
    if world_size == 1:
        return [state]
    states: list[Any] = [None] * world_size
    dist.all_gather_object(states, state)
    return states


def restore_training_state(state: dict[str, Any], step: TrainStep, scheduler, rank: int, seed: int) -> tuple[int, int]:
    """Load a checkpoint's state into the model (queue and pointer included), optimizer, fp16 loss scaler,
    scheduler and this rank's RNG; returns ``(completed epochs, global step)``."""
    unwrap(step.model).load_state_dict(state["model"])
    step.optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        step.scaler.load_state_dict(state["scaler"])
    scheduler.load_state_dict(state["scheduler"])
    if rank < len(state["rng"]):
        restore_rng_state(state["rng"][rank])
    else:  # resumed on more workers than saved the checkpoint
        seed_everything(seed + 1000 * state["epoch"] + rank)
    return state["epoch"], state["global_step"]


def write_training_checkpoint(
    tmp: str,
    step: TrainStep,
    scheduler,
    epoch: int,
    global_step: int,
    rng,
    run_id: str,
    config: dict[str, Any],
    final: bool,
) -> None:
    """Write the checkpoint (plus ``backbone.pt`` after the last epoch) into ``tmp``."""
    model = unwrap(step.model)
    save_checkpoint(
        tmp,
        {
            "model": model.state_dict(),
            "optimizer": step.optimizer.state_dict(),
            "scaler": step.scaler.state_dict(),  # empty unless train.amp=fp16
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "global_step": global_step,
            "rng": rng,
            "mlflow_run_id": run_id,
            "config": tracking.redact_tree(config),  # checkpoints may sit in shared storage: no credentials
        },
    )
    if final:
        torch.save(model.backbone_state_dict(), Path(tmp) / BACKBONE_FILE)


def init_backbones(model, path: Path) -> None:
    """``model.init_weights``: the query encoder's backbone starts from the weights in ``path`` (any layout
    ``weights_io`` reads; the driver checked that they fit) and the key encoder, if any, as its copy."""
    from mocolab.weights_io.files import load_backbone_weights

    model.encoder_q.backbone.load_state_dict(load_backbone_weights(path, f"model.init_weights={path}").state)
    if hasattr(model, "encoder_k"):
        model.encoder_k.load_state_dict(model.encoder_q.state_dict())
