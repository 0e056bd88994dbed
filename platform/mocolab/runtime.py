"""Ray at the edge: start or connect, the one TorchTrainer factory, and the preamble of every worker loop.

Pretraining, linear evaluation and detection all run as Ray Train V2 ``TorchTrainer`` loops; this module is
the only place that builds one, so their scaling, backend, storage and failure settings agree.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from mocolab.config import Config


def ensure_ray() -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` (set by ``ray job submit``), or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", include_dashboard=False)


def torch_trainer(
    loop: Callable[[dict[str, Any]], Any],
    loop_config: dict[str, Any],
    cfg: Config,
    run_name: str,
    num_workers: int,
    max_failures: int = 0,
    keep_checkpoints: Optional[int] = None,
    callbacks: Sequence[Any] = (),
):
    """A TorchTrainer running ``loop(loop_config)`` on ``num_workers`` workers of ``cfg.scaling`` (CPUs and a GPU
    each, gloo on CPU, nccl on GPU), storing under ``cfg.scaling.storage_path/run_name`` (the same name resumes)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    scaling = cfg.scaling
    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})}
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name,
            storage_path=scaling.storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            callbacks=list(callbacks),
        ),
    )


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Worker:
    """Who this Ray Train worker is: the run config, its rank, the world size and its device."""

    cfg: Config
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_chief(self) -> bool:
        """Rank 0: the worker that logs, prints and checkpoints."""
        return self.rank == 0


def start_worker(config: dict[str, Any], seed: int) -> Worker:
    """The preamble of every worker loop: the run config from ``config["config"]`` (the schema's pure rules only;
    the driver's pre-flight step checked files and data), rank, world size, device, one CPU thread per CPU of
    the worker, deterministic algorithms when ``train.deterministic``, and every RNG seeded with ``seed``."""
    import ray.train
    import ray.train.torch

    cfg = Config.model_validate(config["config"])
    context = ray.train.get_context()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed_everything(seed)
    return Worker(cfg, context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device())
