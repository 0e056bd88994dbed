"""Ray at the edge: start or connect, the one TorchTrainer factory and its ``fit``, the resources a local Ray
offers, and the preamble of every worker loop.

Pretraining, linear evaluation and detection all run as Ray Train V2 ``TorchTrainer`` loops; this module is
the only place that builds and fits one, so their scaling, backend, storage, failure, start-up and Ctrl-C
behaviour agree.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from mocolab.config import Config, ConfigError

START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
"""Ray Train V2's wait for a worker group's placement group (read by its controller; default 60 s, then it
retries without end unless ``FailureConfig.controller_failure_limit`` is set)."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped a run; ``run_name`` names the pretraining run to resume, if there is one."""

    def __init__(self, message: str, run_name: Optional[str] = None):
        super().__init__(message)
        self.run_name = run_name


class WorkersNotStartedError(ConfigError):
    """Ray Train could not get the workers' resources within ``scaling.start_timeout_s``."""


def uses_cluster() -> bool:
    """True when commands join the Ray cluster in ``RAY_ADDRESS`` (it may autoscale), False for a local Ray."""
    return bool(os.environ.get("RAY_ADDRESS"))


def worker_resources(scaling) -> dict[str, float]:
    """What one Ray Train worker asks for: ``scaling.cpus_per_worker`` CPUs, a GPU with ``scaling.use_gpu``, and
    the custom ``scaling.resources_per_worker``."""
    return {"CPU": scaling.cpus_per_worker, **({"GPU": 1.0} if scaling.use_gpu else {}), **scaling.resources_per_worker}


def local_resources() -> dict[str, float]:
    """The resources a local Ray holds: the running instance's, else what ``ray.init`` (as :func:`ensure_ray`
    calls it) would give it here: the CPUs and GPUs it detects, no custom resources."""
    import ray

    if ray.is_initialized():
        return dict(ray.cluster_resources())
    from ray._private.utils import get_num_cpus  # what ray.init counts (cgroup limits included)

    return {"CPU": float(get_num_cpus()), "GPU": float(torch.cuda.device_count())}


def describe(resources: dict[str, float]) -> str:
    """``"2 CPU, 0 GPU"`` and any custom resources (Ray's internal ``memory`` and node entries left out)."""
    shown = {"CPU": resources.get("CPU", 0), "GPU": resources.get("GPU", 0)}
    internal = ("memory", "object_store_memory")
    shown.update({k: v for k, v in resources.items() if k not in internal and not k.startswith("node:")})
    return ", ".join(f"{amount:g} {name}" for name, amount in shown.items())


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
    """A TorchTrainer running ``loop(loop_config)`` on ``num_workers`` workers of ``cfg.scaling`` (CPUs, a GPU and
    the custom ``resources_per_worker`` each; gloo on CPU, nccl on GPU), storing under
    ``cfg.scaling.storage_path/run_name`` (the same name resumes)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    scaling = cfg.scaling
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=scaling.use_gpu, resources_per_worker=worker_resources(scaling)
        ),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name,
            storage_path=scaling.storage_path,
            # a worker group that cannot start fails after one wait of scaling.start_timeout_s (see fit)
            failure_config=FailureConfig(max_failures=max_failures, controller_failure_limit=0),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            callbacks=list(callbacks),
        ),
    )


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


@contextlib.contextmanager
def sigint_held() -> Iterator[None]:
    """Ignore Ctrl-C for the block (e.g. while a run's final status is written), in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _pending(cfg: Config, num_workers: int, workers_field: str) -> str:
    each = ", ".join(f"{amount:g} {name}" for name, amount in worker_resources(cfg.scaling).items())
    return f"{num_workers} worker(s) of {each} each ({workers_field}; scaling.cpus_per_worker, use_gpu, resources_per_worker)"


def fit(trainer, cfg: Config, num_workers: int, workers_field: str = "scaling.num_workers"):
    """``trainer.fit()`` with mocolab's guarantees: the workers' resources are awaited at most
    ``scaling.start_timeout_s`` (then WorkersNotStartedError naming what is pending), Ctrl-C or SIGTERM raise
    RunInterrupted (Ray Train's own SIGINT handler aborts the run and exits through ``sys.exit``; it is
    removed again afterwards), and any other failure propagates."""
    import ray
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    pending = _pending(cfg, num_workers, workers_field)
    if uses_cluster():
        print(
            f"[mocolab] asking the cluster for {pending}; waiting at most "
            f"{cfg.scaling.start_timeout_s:g} s (scaling.start_timeout_s) for them",
            flush=True,
        )
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        with _env(START_TIMEOUT_ENV, str(cfg.scaling.start_timeout_s)):
            return trainer.fit()
    except SystemExit as exit:  # raised by Ray's SIGINT handler (or its SIGTERM handler) inside fit
        raise RunInterrupted(f"interrupted (exit {exit.code})") from None
    except ControllerError as err:
        if not isinstance(err.controller_failure, WorkerGroupStartupTimeoutError):
            raise
        raise WorkersNotStartedError(
            f"Ray could not start {pending} within scaling.start_timeout_s="
            f"{cfg.scaling.start_timeout_s:g} s; the cluster has {describe(ray.cluster_resources())} in all. Lower "
            "scaling.num_workers or scaling.cpus_per_worker, add nodes, or raise scaling.start_timeout_s"
        ) from None
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


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
