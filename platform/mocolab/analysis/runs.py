"""Runs from MLflow into pandas: a sweep's trials or an experiment's pretraining runs, metric histories.

Column names are MLflow's (``params.moco.momentum``, ``metrics.knn_top1``, ``tags.mocolab.sweep``),
in ``mlflow.search_runs``' layout; the table math in ``analysis.tables`` works on these frames.
"""

from __future__ import annotations

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run

from mocolab.config import ConfigError, absolute_tracking_uri, default_tracking_uri
from mocolab.tracking.masking import redact
from mocolab.tracking.names import PARENT_RUN_TAG, STAGE_PRETRAIN, STAGE_SWEEP, STAGE_TAG, SWEEP_AXES_TAG, SWEEP_TAG


def resolve_uri(uri: str | None = None) -> str:
    """The tracking URI to read: ``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` (cwd)."""
    from pathlib import Path

    return absolute_tracking_uri(uri or default_tracking_uri(), Path.cwd())


def _run_row(run: Run) -> dict:
    info, data = run.info, run.data
    row = {
        "run_id": info.run_id,
        "experiment_id": info.experiment_id,
        "status": info.status,
        "artifact_uri": info.artifact_uri,
        "start_time": pd.to_datetime(info.start_time, unit="ms", utc=True),
        "end_time": pd.to_datetime(info.end_time, unit="ms", utc=True) if info.end_time else pd.NaT,
    }
    row.update({f"metrics.{k}": v for k, v in data.metrics.items()})
    row.update({f"params.{k}": v for k, v in data.params.items()})
    row.update({f"tags.{k}": v for k, v in data.tags.items()})
    return row


def _search(client: MlflowClient, experiment_ids: list[str], filter_string: str) -> pd.DataFrame:
    """Runs as an ``mlflow.search_runs``-style frame, read through ``client`` (MLflow's fluent search would
    need the process-wide tracking URI, which it also exports to the environment)."""
    rows, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000, page_token=token)
        rows += [_run_row(run) for run in page]
        token = page.token
        if not token:
            break
    return pd.DataFrame(rows, columns=None if rows else ["run_id", "experiment_id", "status", "start_time"])


def _all_experiment_ids(client: MlflowClient) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def find_sweep_parent(uri: str, sweep: str) -> pd.Series:
    """The parent run of sweep ``sweep`` (any experiment); ConfigError if there is none."""
    client = MlflowClient(tracking_uri=uri)
    df = _search(
        client, _all_experiment_ids(client), f"tags.`{STAGE_TAG}` = '{STAGE_SWEEP}' and tags.`{SWEEP_TAG}` = '{sweep}'"
    )
    if df.empty:
        raise ConfigError(
            f"no sweep named '{sweep}' in {redact(uri)}; check the name (the sweep file's 'name:') or pass "
            "--tracking-uri / set MLFLOW_TRACKING_URI to the store the sweep wrote to"
        )
    return df.sort_values("start_time", ascending=False).iloc[0]


def sweep_axes(parent: pd.Series) -> list[str]:
    """The dotted keys a sweep varied, as recorded on its parent run."""
    text = parent.get(f"tags.{SWEEP_AXES_TAG}")
    return [k for k in str(text).split(",") if k] if isinstance(text, str) else []


def load_sweep_runs(uri: str, sweep: str) -> tuple[pd.Series, pd.DataFrame]:
    """``(parent run, trial runs)`` of a sweep: the parent's children tagged with the sweep's name."""
    parent = find_sweep_parent(uri, sweep)
    client = MlflowClient(tracking_uri=uri)
    runs = _search(
        client,
        [parent["experiment_id"]],
        f"tags.`{PARENT_RUN_TAG}` = '{parent['run_id']}' and tags.`{SWEEP_TAG}` = '{sweep}'",
    )
    return parent, runs


def load_experiment_runs(uri: str, experiment: str, stage: str = STAGE_PRETRAIN) -> pd.DataFrame:
    """The runs of ``experiment`` with ``mocolab.stage=stage``; ConfigError if the experiment is missing."""
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ConfigError(f"no experiment named '{experiment}' in {redact(uri)}; experiments there: {names}")
    return _search(client, [exp.experiment_id], f"tags.`{STAGE_TAG}` = '{stage}'")


def metric_history(uri: str, run_ids: list[str], metric: str) -> pd.DataFrame:
    """Per-step values of ``metric`` for each run: columns ``run_id``, ``step``, ``value``."""
    client = MlflowClient(tracking_uri=uri)
    rows = [
        {"run_id": run_id, "step": m.step, "value": m.value}
        for run_id in run_ids
        for m in client.get_metric_history(run_id, metric)
    ]
    return pd.DataFrame(rows, columns=["run_id", "step", "value"]).sort_values(["run_id", "step"], ignore_index=True)
