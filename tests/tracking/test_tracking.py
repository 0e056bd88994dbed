"""MLflow naming, resume and linking against a real sqlite store (no Ray)."""

import pytest
import torch
import yaml
from mlflow import MlflowClient

from mocolab import tracking
from mocolab.config import ConfigError, build_config
from mocolab.weights_io.files import read_weights_file


@pytest.fixture
def cfg(mlflow_uri):
    return build_config({"tracking": {"experiment": "t", "run_name": "run-a"}})


def test_new_run_has_params_tags_and_config(cfg, mlflow_uri):
    run_id, resumed = tracking.start_pretrain_run(cfg)
    assert not resumed
    run = MlflowClient(mlflow_uri).get_run(run_id)
    assert run.info.run_name == "run-a"
    assert run.data.tags[tracking.STAGE_TAG] == "pretrain"
    assert run.data.params["moco.temperature"] == str(cfg.moco.temperature)
    assert "tracking.tracking_uri" not in run.data.params
    path = MlflowClient(mlflow_uri).download_artifacts(run_id, tracking.CONFIG_ARTIFACT)
    assert yaml.safe_load(open(path))["moco"]["queue_size"] == cfg.moco.queue_size


def test_unfinished_run_resumes_and_finished_is_refused(cfg, mlflow_uri):
    run_id, _ = tracking.start_pretrain_run(cfg)
    tracking.end_run(mlflow_uri, run_id, "FAILED")
    again, resumed = tracking.start_pretrain_run(cfg)
    assert (again, resumed) == (run_id, True)
    assert MlflowClient(mlflow_uri).get_run(run_id).info.status == "RUNNING"
    tracking.end_run(mlflow_uri, run_id)
    with pytest.raises(tracking.RunFinishedError, match="tracking.run_name"):
        tracking.start_pretrain_run(cfg)


def test_eval_run_is_linked_and_copied(cfg, mlflow_uri):
    pretrain_id, _ = tracking.start_pretrain_run(cfg)
    eval_id = tracking.start_eval_run(cfg, "lincls", {"eval.lincls.lr": 30}, pretrain_run_id=pretrain_id)
    tracking.record_downstream(mlflow_uri, pretrain_id, {"lincls_top1": 55.5}, eval_id, "lincls")
    client = MlflowClient(mlflow_uri)
    ev = client.get_run(eval_id)
    assert ev.data.tags[tracking.PRETRAIN_RUN_TAG] == pretrain_id
    assert ev.data.tags[tracking.STAGE_TAG] == "lincls"
    pre = client.get_run(pretrain_id)
    assert pre.data.metrics["lincls_top1"] == 55.5
    assert pre.data.tags["mocolab.lincls_run_id"] == eval_id


def test_load_pretrain_artifacts(cfg, mlflow_uri, tmp_path):
    run_id, _ = tracking.start_pretrain_run(cfg)
    weights = tmp_path / tracking.BACKBONE_ARTIFACT
    torch.save({"conv1.weight": torch.ones(2, 3, 1, 1)}, weights)
    tracking.log_file(mlflow_uri, run_id, weights)
    config, state = tracking.load_pretrain_artifacts(mlflow_uri, run_id, read_weights_file)
    assert config["tracking"]["run_name"] == "run-a"
    assert torch.equal(state["conv1.weight"], torch.ones(2, 3, 1, 1))
    with pytest.raises(ConfigError, match="no such MLflow run"):
        tracking.load_pretrain_artifacts(mlflow_uri, "0" * 32, read_weights_file)


def test_unreachable_server_fails_fast_naming_uri():
    with pytest.raises(ConfigError, match="http://127.0.0.1:9"):
        tracking.client_for("http://127.0.0.1:9")


def test_unwritable_sqlite_folder_is_named():
    with pytest.raises(ConfigError, match="/no/such/folder"):
        tracking.client_for("sqlite:////no/such/folder/mlflow.db")


def test_redact_removes_credentials(monkeypatch):
    monkeypatch.setenv("MYSERVICE_API_KEY", "sk-abcdef123")
    assert tracking.redact("https://user:pw@host/x") == "https://***@host/x"
    assert tracking.redact("token sk-abcdef123 here") == "token *** here"
