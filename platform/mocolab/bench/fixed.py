"""Fixed costs of a run besides start-up (see ``pretrain_run.py``): checkpoint save and load time and size.

The checkpoint holds what the training loop saves (ARCHITECTURE.md: both encoders, heads, queue and pointer,
optimizer with its momentum buffers, fp16 loss scaler, scheduler, counters, RNG state, config), written and
read with ``train/checkpoint.py`` itself.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mocolab.bench.spec import StepSpec
from mocolab.bench.step import synthetic_batch, train_step
from mocolab.train.checkpoint import CHECKPOINT_FILE, capture_rng_state, load_checkpoint, save_checkpoint


@dataclass(frozen=True)
class CheckpointCost:
    save_s: float
    load_s: float
    size_mb: float


def training_state(spec: StepSpec, config: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint dict with the training loop's contents after one step of ``spec`` (optimizer buffers set)."""
    step = train_step(spec)
    scheduler = torch.optim.lr_scheduler.LambdaLR(step.optimizer, lambda _: 1.0)
    step(*synthetic_batch(spec))
    scheduler.step()
    return {
        "model": step.model.state_dict(),
        "optimizer": step.optimizer.state_dict(),
        "scaler": step.scaler.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": 1,
        "global_step": 1,
        "rng": [capture_rng_state()],
        "mlflow_run_id": "0" * 32,
        "config": config,
    }


def checkpoint_cost(spec: StepSpec, config: dict[str, Any], directory: Path | None = None) -> CheckpointCost:
    """Seconds to save and to load (``weights_only``) the checkpoint of ``spec``, and its size in MB (1e6 bytes),
    in ``directory`` (default: a temporary one, removed after)."""
    state = training_state(spec, config)
    with tempfile.TemporaryDirectory(prefix="mocolab-bench-ckpt-", dir=directory) as tmp:
        start = time.perf_counter()
        save_checkpoint(tmp, state)
        saved = time.perf_counter()
        load_checkpoint(tmp)
        loaded = time.perf_counter()
        size = (Path(tmp) / CHECKPOINT_FILE).stat().st_size
    return CheckpointCost(save_s=saved - start, load_s=loaded - saved, size_mb=size / 1e6)
