"""Tracking that outlives the cluster: an MLflow server on PostgreSQL with artifacts in an S3 bucket keeps every run,
param, metric and artifact when the server and its machine's disk go away (what `ray down` did to the SQLite store
on the head); a PostgreSQL tracking URI is checked before compute and its password is never shown or recorded."""

from __future__ import annotations

import shutil
import sys
import urllib.parse
from pathlib import Path

import psycopg
import pytest
import yaml

from mocolab import tracking
from mocolab.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "experiments" / "pretrain" / "quickstart.yaml"
ARTIFACTS_PREFIX = "mocolab/mlflow-artifacts/"


def password_of(uri: str) -> str:
    return urllib.parse.urlsplit(uri).password


def with_wrong_password(uri: str) -> str:
    return uri.replace(password_of(uri), "not-a-password")


def test_a_running_database_passes_the_check(postgres):
    tracking.check_reachable(postgres)


@pytest.mark.parametrize(
    "change, reason",
    [
        (with_wrong_password, 'password authentication failed for user "mlflow"'),
        (lambda uri: uri.rsplit("/", 1)[0] + "/nosuchdb", 'database "nosuchdb" does not exist'),
    ],
    ids=["wrong-password", "missing-database"],
)
def test_a_refused_database_is_one_line_naming_the_uri_with_the_password_masked(postgres, change, reason):
    uri = change(postgres)
    with pytest.raises(ConfigError) as err:
        tracking.check_reachable(uri)
    message = str(err.value)
    host = urllib.parse.urlsplit(uri).netloc.split("@")[1]
    assert message.startswith(f"MLflow store postgresql://***@{host}/") and "is unreachable" in message
    assert reason in message and "MLFLOW_TRACKING_URI" in message
    assert "\n" not in message
    assert password_of(uri) not in message and password_of(postgres) not in message


def test_a_run_on_the_database_records_no_password(postgres, tmp_path, monkeypatch):
    """Clients may use the database directly: the run's params, tags and config artifact hold the URI masked."""
    monkeypatch.chdir(tmp_path)  # the direct store's default artifact root is ./mlruns
    overrides = [f"tracking.tracking_uri={postgres}", "tracking.experiment=postgres-direct"]
    monkeypatch.setattr(sys, "argv", ["mocolab", "pretrain", str(QUICKSTART), *(f"--set={o}" for o in overrides)])
    cfg = load_config(QUICKSTART, overrides)
    run_id, resumed = tracking.start_pretrain_run(cfg)
    client = tracking.mlflow_client(postgres)
    run = client.get_run(run_id)
    config_text = Path(client.download_artifacts(run_id, tracking.CONFIG_ARTIFACT, str(tmp_path))).read_text()

    assert not resumed and run.info.run_name == cfg.tracking.run_name
    assert "postgresql://***@127.0.0.1:" in run.data.tags[tracking.COMMAND_TAG]
    assert yaml.safe_load(config_text)["tracking"]["tracking_uri"].startswith("postgresql://***@127.0.0.1:")
    recorded = [*run.data.params.values(), *run.data.tags.values(), config_text]
    assert not [text for text in recorded if password_of(postgres) in text]


def _snapshot(client, experiment: str) -> dict:
    """Everything the store holds about an experiment's runs: info, params, tags, metric histories, artifacts."""
    exp = client.get_experiment_by_name(experiment)
    runs = {}
    for run in client.search_runs([exp.experiment_id]):
        run_id = run.info.run_id
        runs[run_id] = {
            "name": run.info.run_name,
            "status": run.info.status,
            "params": run.data.params,
            "tags": run.data.tags,
            "metrics": {m: [(h.step, h.value) for h in client.get_metric_history(run_id, m)] for m in run.data.metrics},
            "artifacts": sorted(f.path for f in client.list_artifacts(run_id)),
        }
    return runs


@pytest.mark.slow  # ~35 s: two MLflow server starts on PostgreSQL, ~20 tracking calls over HTTP
def test_runs_params_metrics_and_artifacts_outlive_the_server(mlflow_on_postgres, postgres, s3, tmp_path):
    uri, experiment = mlflow_on_postgres.uri, "outlives-the-cluster"
    cfg = load_config(QUICKSTART, [f"tracking.tracking_uri={uri}", f"tracking.experiment={experiment}"])
    client = tracking.client_for(uri)
    run_id, _ = tracking.start_pretrain_run(cfg)
    tracking.log_metrics(client, run_id, {tracking.LOSS: 2.5, tracking.KNN_TOP1: 0.2}, step=1)
    tracking.log_metrics(client, run_id, {tracking.LOSS: 1.5, tracking.KNN_TOP1: 0.4}, step=2)
    backbone = tmp_path / tracking.BACKBONE_ARTIFACT
    backbone.write_bytes(b"backbone weights \x00\x01\x02")
    tracking.log_file(uri, run_id, backbone)
    tracking.end_run(uri, run_id)
    eval_id = tracking.start_eval_run(cfg, tracking.STAGE_LINCLS, {"epochs": 3}, pretrain_run_id=run_id)
    tracking.record_downstream(uri, run_id, {"lincls_top1": 0.5}, eval_id, tracking.STAGE_LINCLS)
    tracking.end_run(uri, eval_id)
    before = _snapshot(client, experiment)

    # The artifacts are objects in the bucket, under the cluster's layout.
    keys = s3.keys(ARTIFACTS_PREFIX)
    for name in (tracking.CONFIG_ARTIFACT, tracking.BACKBONE_ARTIFACT):
        assert [k for k in keys if k.endswith(f"/{run_id}/artifacts/{name}")], (name, keys)

    # The server goes, and with it its machine's disk; the runs are rows in PostgreSQL.
    mlflow_on_postgres.stop()
    with psycopg.connect(postgres) as conn:
        stored = conn.execute("SELECT run_uuid FROM runs WHERE run_uuid = ANY(%s)", ([run_id, eval_id],)).fetchall()
    assert sorted(row[0] for row in stored) == sorted([run_id, eval_id])
    for entry in mlflow_on_postgres.folder.iterdir():
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    mlflow_on_postgres.start()

    after = _snapshot(tracking.client_for(uri), experiment)
    assert after == before
    assert set(after) == {run_id, eval_id}
    assert after[run_id]["metrics"][tracking.LOSS] == [(1, 2.5), (2, 1.5)]
    assert after[run_id]["tags"][tracking.downstream_tag(tracking.STAGE_LINCLS)] == eval_id
    assert after[eval_id]["tags"][tracking.PRETRAIN_RUN_TAG] == run_id
    fetched = tracking.mlflow_client(uri).download_artifacts(run_id, tracking.BACKBONE_ARTIFACT, str(tmp_path / "back"))
    assert Path(fetched).read_bytes() == backbone.read_bytes()
