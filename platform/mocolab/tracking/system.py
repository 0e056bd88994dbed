"""What a run used: MLflow's system-metrics monitor (``system/...``) and compute accounting (``worker_seconds``,
``device_hours``, ``cost``; the arithmetic is ``mocolab.compute``'s)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from mocolab import compute
from mocolab.config import Config
from mocolab.tracking.names import (
    COST,
    DEVICE_HOURS,
    PRETRAIN_RUN_TAG,
    STAGE_DETECTION,
    STAGE_LINCLS,
    STAGE_TAG,
    WORKER_SECONDS,
)
from mocolab.tracking.runs import child_runs, log_metrics
from mocolab.tracking.store import mlflow_client

if TYPE_CHECKING:  # mlflow is imported where it is used
    from mlflow import MlflowClient
    from mlflow.entities import Run


def start_system_metrics(uri: str, run_id: str, interval_s: float, node_id: str | None = None):
    """Start MLflow's system-metrics monitor on run ``run_id``: CPU, memory, disk and network (and the GPUs, when
    nvidia-ml-py finds any) sampled every ``interval_s`` seconds as ``system/...`` metrics (``system/<node_id>/...``
    if given), continuing the steps of a resumed run. Returns the monitor, or None when ``interval_s`` is 0."""
    if not interval_s:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=interval_s, resume_logging=True, node_id=node_id, tracking_uri=uri
    )
    monitor.start()
    return monitor


def stop_system_metrics(monitor) -> None:
    """Stop a monitor of :func:`start_system_metrics` (None: nothing to do), then log one last sample: MLflow's
    monitor logs only after a full interval, so a run shorter than one would otherwise have none."""
    if monitor is None:
        return
    monitor.finish()
    monitor.collect_metrics()
    monitor.publish_metrics(monitor.aggregate_metrics())
    monitor.mlflow_logger.flush()


def usage_of(run: Run) -> compute.ComputeUsage:
    """The compute a run has logged so far (zero if none)."""
    metrics = run.data.metrics
    return compute.ComputeUsage(metrics.get(WORKER_SECONDS, 0.0), metrics.get(DEVICE_HOURS, 0.0), metrics.get(COST))


def log_usage(client: MlflowClient, run_id: str, usage: compute.ComputeUsage) -> None:
    log_metrics(
        client,
        run_id,
        {WORKER_SECONDS: usage.worker_seconds, DEVICE_HOURS: usage.device_hours, COST: usage.cost},
        step=0,
    )


@contextmanager
def compute_recorded(cfg: Config, run_id: str, num_workers: int) -> Iterator[None]:
    """Time the block (a Ray Train fit of ``num_workers`` workers of ``cfg.scaling``) and add its usage to run
    ``run_id``'s totals, whether it ends, fails or is interrupted (if the block raised, a failure to log only
    prints a warning, so that the block's own exception is the one raised)."""
    started = time.monotonic()

    def record() -> None:
        attempt = compute.usage(
            time.monotonic() - started,
            num_workers,
            compute.devices_per_worker(cfg.scaling.use_gpu, cfg.scaling.cpus_per_worker),
            cfg.tracking.price_per_device_hour,
        )
        client = mlflow_client(cfg.tracking.tracking_uri)
        log_usage(client, run_id, usage_of(client.get_run(run_id)) + attempt)

    try:
        yield
    except BaseException:
        try:
            record()
        except Exception as err:  # mlflow raises its own exception types
            print(f"[mocolab] could not log the compute of run {run_id}: {err}", file=sys.stderr, flush=True)
        raise
    record()


def sweep_usage(uri: str, experiment: str, parent_run_id: str) -> compute.ComputeUsage:
    """The compute of a sweep: its trials' pretraining runs and the evaluation runs of those."""
    client = mlflow_client(uri)
    trials = child_runs(uri, experiment, parent_run_id)
    trial_ids = {run.info.run_id for run in trials}
    exp = client.get_experiment_by_name(experiment)
    evals = (
        [
            run
            for stage in (STAGE_LINCLS, STAGE_DETECTION)
            for run in client.search_runs(
                [exp.experiment_id], filter_string=f"tags.`{STAGE_TAG}` = '{stage}'", max_results=50000
            )
            if run.data.tags.get(PRETRAIN_RUN_TAG) in trial_ids
        ]
        if exp is not None
        else []
    )
    return compute.total(usage_of(run) for run in [*trials, *evals])
