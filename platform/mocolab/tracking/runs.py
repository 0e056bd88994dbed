"""Runs: experiments, finding a run by name, creating a pretraining or evaluation run or resuming an unfinished
one, params and metrics, linking an evaluation to its pretraining run, ending a run."""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING, Any

from mocolab.config import Config, ConfigError
from mocolab.tracking.artifacts import DatasetFacts, log_config_artifact, log_dataset_input
from mocolab.tracking.masking import redact
from mocolab.tracking.names import (
    DRIVER_TAG,
    EXPERIMENT_KIND_TAG,
    INIT_TAG,
    MAX_PARAM_CHARS,
    MODEL_TRAINING_KIND,
    NO_LOADABLE_CHECKPOINT_TAG,
    NONFINITE_LOSS_TAG,
    PARENT_RUN_TAG,
    PRETRAIN_RUN_TAG,
    STAGE_PRETRAIN,
    STAGE_TAG,
    downstream_tag,
)
from mocolab.tracking.source import (
    DRIVER_ALIVE,
    DRIVER_GONE,
    DRIVER_UNKNOWN,
    driver_id,
    driver_state,
    process_start,
    source_tags,
)
from mocolab.tracking.store import client_for, mlflow_client

if TYPE_CHECKING:  # mlflow is imported where it is used
    from mlflow import MlflowClient
    from mlflow.entities import Run


class RunFinishedError(ConfigError):
    """A run of this name already finished: resuming it would mix two runs."""


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if missing, tagged as model training (an experiment of an older
    mocolab, without a kind, gets the tag; another kind is left alone)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return exp.experiment_id


def find_run(client: MlflowClient, experiment: str, run_name: str) -> Run | None:
    """The newest run called ``run_name`` in ``experiment``, or None."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    escaped = run_name.replace("'", "\\'")
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"attributes.run_name = '{escaped}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def ui_link(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI of a tracking server (None for other stores), opened on the model-training
    view: MLflow 3.17's UI starts on its GenAI view unless told ``workflowType=machine_learning``."""
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{redact(uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def params_of(cfg: Config, extra: dict[str, Any] | None = None) -> dict[str, str]:
    """The flattened config and ``extra`` params (e.g. the mechanism's, ``moco.mechanisms.run_params``) as MLflow
    params: dotted keys, stringified, credentials removed."""
    flat = cfg.flat() | (extra or {})
    flat.pop("tracking.tracking_uri", None)
    return {k: redact(str(v))[:MAX_PARAM_CHARS] for k, v in flat.items()}


def log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    """Log params in batches (MLflow caps a batch at 100 params)."""
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int, wait: bool = True) -> Any:
    """Log numeric metrics at ``step`` in one call; None values are skipped. With ``wait=False`` the call returns at
    once and MLflow writes in a background thread: the result (``None`` if nothing was logged) has ``wait()``, which
    must be called before the run's metrics are read elsewhere."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
    if batch:
        return client.log_batch(run_id, metrics=batch, synchronous=wait)
    return None


def _check_unfinished(run: Run, cfg: Config) -> None:
    """Before resuming an unfinished run: refuse a FINISHED one or one a live driver still runs; say so when
    a RUNNING one was left behind by a driver that is gone (killed, crashed, its machine rebooted)."""
    name, run_id = cfg.tracking.run_name, run.info.run_id
    if run.info.status == "FINISHED":
        raise RunFinishedError(
            f"run '{name}' in experiment '{cfg.tracking.experiment}' already finished "
            f"(MLflow run {run_id}); start a new run by omitting tracking.run_name "
            "or with --set tracking.run_name=<new name>"
        )
    if run.info.status != "RUNNING":
        return
    tag = run.data.tags.get(DRIVER_TAG)
    state = driver_state(tag, socket.gethostname(), os.getpid(), process_start)
    host, pid, _ = tag.rsplit(":", 2) if tag and tag.count(":") >= 2 else ("an unknown host", "?", "")
    if state == DRIVER_ALIVE:
        raise ConfigError(
            f"run '{name}' (MLflow run {run_id}) is RUNNING in process {pid} on {host}; wait for it to end or stop "
            "it (Ctrl-C there), or start a new run with --set tracking.run_name=<new name>"
        )
    if state == DRIVER_GONE:
        print(
            f"[mocolab] found a stale run '{name}' (MLflow run {run_id}) left RUNNING by a driver that is gone "
            f"(process {pid} on {host}); resuming it",
            flush=True,
        )
    elif state == DRIVER_UNKNOWN:
        print(
            f"[mocolab] run '{name}' (MLflow run {run_id}) is marked RUNNING by a driver on {host} that cannot be "
            "checked from here; resuming it (stop that driver if it still runs)",
            flush=True,
        )


def start_pretrain_run(
    cfg: Config,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    extra_params: dict[str, Any] | None = None,
    dataset: DatasetFacts | None = None,
) -> tuple[str, bool]:
    """Create the pretraining run named ``tracking.run_name`` (params: the config and ``extra_params``), or resume
    it if it exists unfinished; either way the run records this process as its driver (``DRIVER_TAG``).

    A new run logs ``dataset`` (``data.datasets.summarize`` of the training set) as its dataset input.
    Returns ``(run_id, resumed)``. A FINISHED run of that name is refused (RunFinishedError), so is one whose
    driver still runs; a RUNNING one whose driver is gone is resumed with a notice."""
    client = client_for(cfg.tracking.tracking_uri)
    existing = find_run(client, cfg.tracking.experiment, cfg.tracking.run_name)
    if existing is not None:
        _check_unfinished(existing, cfg)
        run_id = existing.info.run_id
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, DRIVER_TAG, driver_id())
        for tag in (NONFINITE_LOSS_TAG, NO_LOADABLE_CHECKPOINT_TAG):  # an earlier attempt's stop is not this one's
            if tag in existing.data.tags:
                client.delete_tag(run_id, tag)
        return run_id, True
    tags = {STAGE_TAG: STAGE_PRETRAIN, DRIVER_TAG: driver_id(), **source_tags(), **(extra_tags or {})}
    if parent_run_id:
        tags[PARENT_RUN_TAG] = parent_run_id
    run = client.create_run(experiment_id(client, cfg.tracking.experiment), run_name=cfg.tracking.run_name, tags=tags)
    run_id = run.info.run_id
    log_params(client, run_id, params_of(cfg, extra_params))
    log_config_artifact(client, run_id, cfg)
    if dataset is not None:
        log_dataset_input(client, run_id, dataset, cfg.data.dataset)
    return run_id, False


def start_eval_run(
    cfg: Config,
    stage: str,
    params: dict[str, Any],
    pretrain_run_id: str | None = None,
    init: str = "pretrain",
    run_name: str | None = None,
    extra_tags: dict[str, str] | None = None,
) -> str:
    """Create an evaluation run (``stage`` = lincls|detection), linked to its pretraining run by tag."""
    client = client_for(cfg.tracking.tracking_uri)
    tags = {STAGE_TAG: stage, INIT_TAG: init, **source_tags(), **(extra_tags or {})}
    if pretrain_run_id:
        tags[PRETRAIN_RUN_TAG] = pretrain_run_id
    run = client.create_run(
        experiment_id(client, cfg.tracking.experiment),
        run_name=run_name or f"{stage}-{cfg.tracking.run_name}",
        tags=tags,
    )
    log_params(client, run.info.run_id, {k: redact(str(v))[:MAX_PARAM_CHARS] for k, v in params.items()})
    return run.info.run_id


def record_downstream(
    uri: str, pretrain_run_id: str, metrics: dict[str, float], source_run_id: str, stage: str
) -> None:
    """Copy an evaluation's headline metrics onto its pretraining run, tagging where they came from."""
    client = client_for(uri)
    log_metrics(client, pretrain_run_id, metrics, step=0)
    client.set_tag(pretrain_run_id, downstream_tag(stage), source_run_id)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark a run FINISHED, FAILED or KILLED."""
    mlflow_client(uri).set_terminated(run_id, status=status)


def child_runs(uri: str, experiment: str, parent_run_id: str) -> list[Run]:
    """Runs whose ``mlflow.parentRunId`` is ``parent_run_id``."""
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return list(client.search_runs([exp.experiment_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'"))
