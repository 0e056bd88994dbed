"""Ray at the edge: start or connect, the one TorchTrainer factory and its ``fit``, the resources a local Ray
offers, and the preamble of every worker loop.

Pretraining, linear evaluation and detection all run as Ray Train V2 ``TorchTrainer`` loops; this module is
the only place that builds and fits one, so their scaling, backend, storage, failure, start-up and Ctrl-C
behaviour agree.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mocolab.config import Config, ConfigError
from mocolab.console import PROGRESS_ENV, VERBOSE_ENV, is_verbose, progress_mode

QUIET_RAY_LEVEL = "ERROR"
"""Unless verbose: the level of Ray's logging in the driver and the job's processes, and of Ray Train's console
(Ray Train's log files, ``logs/train/`` in the Ray session folder, keep everything)."""
QUIET_WORKER_CONSOLE = "WARNING"
TRAINING_FUNCTION_ERROR = "Error in training function"  # how Ray Train V2 logs a worker's exception, traceback below
"""Unless verbose: the level of a Ray Train worker's console for everything outside ``ray.train`` (mocolab's own
warnings, e.g. skipped corrupt images, still show)."""
GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"
RAY_FIXED_PORTS = frozenset({6379, 8265, 10001, 52365})
"""Ports a local Ray head takes by default: GCS 6379, dashboard 8265, client server 10001, dashboard agent 52365."""
# Idle worker processes a local Ray keeps. Ray's default is the node's CPU count, which the training workers and the
# run's actors already reach on a small machine, so it killed Ray Data's decode workers 1 s after each epoch's last
# task and restarted them (importing torch again: ~10 s on 2 cores) at the next epoch.
LOCAL_IDLE_WORKERS_KEPT = 32


def ray_job_env(address: str | None) -> dict[str, str]:
    """Environment variables for every process of the Ray job this command starts (Ray's own settings):

    - ``RAY_ADDRESS``: the cluster's address, so that Ray Train's placement-group cleaner, which asks Ray's State
      API, finds this cluster rather than failing when a machine runs several Ray instances;
    - ``RAY_TRAIN_ENABLE_PRINT_PATCH=0``: a worker's ``print`` goes to its stdout once (Ray Train's patched print
      also sends it to a logger, and the console showed it twice);
    - ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0``: mocolab's loops do not act on node-drain notices (a lost node is
      handled by ``train.max_failures`` restarts from the last checkpoint), and the watcher's actor logs errors;
    - ``RAY_worker_niceness=0``: the job's workers run at normal priority, not at Ray's default nice 15, under
      which every wake-up of Ray's own processes (GCS, raylet, agents, Train's controller actors) preempted a
      training worker and its lockstep peers waited at the next collective (on 2 CPUs: 10-20 % of the epoch
      throughput against the same training in plain DDP, ``mocolab bench --what launcher``);
    - mocolab's verbosity, its progress mode (bars for a terminal, lines otherwise) and MLflow's console level, for
      sweep trials and workers.

    A variable already set in this process keeps its value; one the submitted job's own runtime environment sets
    is left to it (Ray refuses to merge the same key twice)."""
    wanted = {
        PROGRESS_ENV: progress_mode(),
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        "RAY_worker_niceness": "0",
        VERBOSE_ENV: "1" if is_verbose() else "0",
        "MLFLOW_LOGGING_LEVEL": "INFO" if is_verbose() else "WARNING",
    }
    env = {key: os.environ.get(key, value) for key, value in wanted.items()}
    if address and address not in ("auto", "local"):
        env["RAY_ADDRESS"] = address
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))  # set by `ray job submit`
    submitted = (job_config.get("runtime_env") or {}).get("env_vars") or {}
    return {key: value for key, value in env.items() if key not in submitted}


START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
"""Ray Train V2's wait for a worker group's placement group (read by its controller; default 60 s, then it
retries without end unless ``FailureConfig.controller_failure_limit`` is set)."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped a run; ``run_name`` names the pretraining run to resume, if there is one."""

    def __init__(self, message: str, run_name: str | None = None):
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


def run_on_worker_nodes(
    fn: Callable[..., Any], args: Sequence[Any], per_worker: dict[str, float], timeout_s: float
) -> dict[str, Any]:
    """``fn(*args)`` once on every live node of the connected cluster that could hold a worker asking for ``per_worker``
    (pinned there, asking for no resources, so it runs beside busy workers); ``{node address: its result}``, empty
    when no such node is up (an autoscaler adds them on demand). A node that does not answer within ``timeout_s``
    raises ``ray.exceptions.GetTimeoutError``."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [
        node for node in ray.nodes()
        if node["Alive"] and all(node["Resources"].get(name, 0) >= amount for name, amount in per_worker.items())
    ]  # fmt: skip
    remote = ray.remote(num_cpus=0, max_retries=0)(fn)
    refs = {
        node["NodeManagerAddress"] + f":{node['NodeManagerPort']}": remote.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(*args)
        for node in nodes
    }
    return dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s)))


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
    """Connect to the cluster in ``RAY_ADDRESS`` (set by ``ray job submit``), or start a local Ray (no web
    dashboard, so no State API: Ray Train's placement-group cleaner then warns every second that it cannot query
    it); either way with the job environment of :func:`ray_job_env` and, unless verbose, the logging of the driver
    and of every process of the job (``ray.LoggingConfig``) at :data:`QUIET_RAY_LEVEL`. Verbose, Ray's defaults
    apply (INFO, worker lines prefixed with their process)."""
    import ray

    if ray.is_initialized():
        return
    quiet = (
        {}
        if is_verbose()
        else {
            "logging_level": QUIET_RAY_LEVEL,
            # also drops the "(RayTrainWorker pid=...)" prefix of the lines workers print (Ray does so for a job
            # with a logging config), so the console shows mocolab's lines as they are
            "logging_config": ray.LoggingConfig(log_level=QUIET_RAY_LEVEL),
        }
    )
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": ray_job_env(address)}, **quiet)
        return
    port = _free_port()
    previous = os.environ.get(GCS_PORT_ENV)
    os.environ[GCS_PORT_ENV] = str(port)  # Ray's setting for the port of a head it starts
    try:
        ray.init(
            address="local",
            include_dashboard=False,
            _system_config={"num_workers_soft_limit": LOCAL_IDLE_WORKERS_KEPT},
            runtime_env={"env_vars": ray_job_env(f"127.0.0.1:{port}")},
            **quiet,
        )
    finally:
        if previous is None:
            os.environ.pop(GCS_PORT_ENV)
        else:
            os.environ[GCS_PORT_ENV] = previous


def _free_port() -> int:
    """A free port for the local head's GCS, never one of :data:`RAY_FIXED_PORTS` (Ray refuses to start when its
    GCS port equals one of them: ray-project/ray#37229; 52365 lies in Linux's ephemeral range)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in RAY_FIXED_PORTS:
            return port


def torch_trainer(
    loop: Callable[[dict[str, Any]], Any],
    loop_config: dict[str, Any],
    cfg: Config,
    run_name: str,
    num_workers: int,
    max_failures: int = 0,
    keep_checkpoints: int | None = None,
    callbacks: Sequence[Any] = (),
    datasets: dict[str, Any] | None = None,
):
    """A TorchTrainer running ``loop(loop_config)`` on ``num_workers`` workers of ``cfg.scaling`` (CPUs, a GPU and
    the custom ``resources_per_worker`` each; gloo on CPU, nccl on GPU), storing under
    ``cfg.scaling.storage_path/run_name`` (the same name resumes). Ray Train's own console output is at
    :data:`QUIET_RAY_LEVEL` unless verbose (its log files keep everything). ``datasets``: Ray Data datasets by name,
    each split equally among the workers (``ray.train.get_dataset_shard(name)``; every worker gets as many rows)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    scaling = cfg.scaling
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        datasets=datasets,
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
            logging_config=LoggingConfig(log_level="INFO" if is_verbose() else QUIET_RAY_LEVEL),
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
    fields = "scaling.cpus_per_worker, use_gpu, resources_per_worker"
    return f"{num_workers} worker(s) of {each} each ({workers_field}; {fields})"


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


def _quiet_worker_console() -> None:
    """Raise the console handlers of the worker's root logger to :data:`QUIET_WORKER_CONSOLE`. Ray Train sets them
    to INFO, and its per-report ``Reporting training result ...`` lines come from a logger outside ``ray.train``
    (named by its file) that its LoggingConfig does not reach; the worker's log file handler keeps everything."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(QUIET_WORKER_CONSOLE)
            handler.addFilter(_no_training_function_traceback)


def _no_training_function_traceback(record: logging.LogRecord) -> bool:
    """Keep Ray Train's ``Error in training function:`` traceback off the worker's console: the driver prints the
    error's own last line (``cli.py``: e.g. the unreadable image's path and the fix) and writes the full traceback to
    its log file; the worker's log file keeps it too."""
    return not record.getMessage().startswith(TRAINING_FUNCTION_ERROR)


def start_worker(config: dict[str, Any], seed: int) -> Worker:
    """The preamble of every worker loop: the run config from ``config["config"]`` (the schema's pure rules only;
    the driver's pre-flight step checked files and data), rank, world size, device, one CPU thread per CPU of
    the worker, deterministic algorithms when ``train.deterministic``, every RNG seeded with ``seed``, and the
    worker's console quiet unless verbose."""
    import ray.train
    import ray.train.torch

    cfg = Config.model_validate(config["config"])
    if not is_verbose():
        _quiet_worker_console()
    context = ray.train.get_context()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed_everything(seed)
    return Worker(cfg, context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device())
