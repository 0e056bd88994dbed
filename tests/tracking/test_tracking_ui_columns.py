"""What fills the MLflow UI: the experiment's kind, a run's source tags, its dataset input and its logged model
(a sqlite store, no Ray)."""

from __future__ import annotations

import json
import sys

import mlflow
import pytest
import torch
from image_folders import make_folder
from mlflow import MlflowClient

from mocolab import tracking
from mocolab.config import build_config
from mocolab.data.sources import summarize
from mocolab.moco.backbones import make_backbone


@pytest.fixture
def folder_cfg(tmp_path, mlflow_uri):
    make_folder(tmp_path / "photos")
    return build_config({
        "model": {"arch": "small_cnn"},
        "data": {"dataset": "folder", "root": str(tmp_path / "photos"), "image_size": 16},
        "tracking": {"experiment": "ui", "run_name": "ui-run", "register_model": "mocolab-backbone"},
    })  # fmt: skip


def test_experiments_open_as_model_training(mlflow_uri):
    client = MlflowClient(mlflow_uri)
    new = tracking.experiment_id(client, "fresh")
    old = client.create_experiment("made-by-an-older-mocolab")
    genai = client.create_experiment("genai", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    for exp_id in (new, old, genai):
        tracking.experiment_id(client, client.get_experiment(exp_id).name)
    assert client.get_experiment(new).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert client.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert client.get_experiment(genai).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"


def test_a_run_records_the_command_commit_and_dataset(folder_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/mocolab", "pretrain", "c.yaml", "--set",
                                      "tracking.tracking_uri=https://bob:pw-123@mlflow.example"])  # fmt: skip
    run_id, _ = tracking.start_pretrain_run(folder_cfg, dataset=summarize(folder_cfg.data, "train"))
    run = MlflowClient(folder_cfg.tracking.tracking_uri).get_run(run_id)
    tags = run.data.tags
    assert tags[tracking.SOURCE_NAME_TAG] == "mocolab pretrain"  # the UI's Source column shows it after the last '/'
    assert (
        tags[tracking.COMMAND_TAG] == "mocolab pretrain c.yaml --set tracking.tracking_uri=https://***@mlflow.example"
    )
    assert tags[tracking.SOURCE_TYPE_TAG] == "LOCAL"
    assert tags[tracking.SOURCE_GIT_COMMIT_TAG] == tags[tracking.GIT_COMMIT_TAG] == tracking.git_commit()
    (dataset_input,) = run.inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert (dataset.name, dataset.source_type) == ("photos", "local")
    assert json.loads(dataset.source)["uri"] == str(tmp_path / "photos")
    assert json.loads(dataset.profile) == {"num_images": 6} and len(dataset.digest) == 16
    assert [(t.key, t.value) for t in dataset_input.tags] == [("mlflow.data.context", "training")]


def test_ui_link_opens_the_model_training_view_of_a_server():
    link = tracking.ui_link("https://bob:pw-123@mlflow.example/", "7", "abc")
    assert link == "https://***@mlflow.example/#/experiments/7/runs/abc?workflowType=machine_learning"
    assert tracking.ui_link("sqlite:////tmp/m.db", "7", "abc") is None


def test_command_line_outside_the_cli_is_plain_mocolab(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/ray/_private/workers/default_worker.py", "--node-ip-address=1.2.3.4"])
    assert tracking.command_line() == "mocolab"
    monkeypatch.setattr(sys, "argv", ["/x/platform/mocolab/cli.py", "sweep", "s.yaml"])  # python -m mocolab.cli
    assert tracking.command_line() == "mocolab sweep s.yaml"


@pytest.mark.slow  # torch.export and a load-back: ~30-90 s on 2 shared cores
def test_the_backbone_is_a_logged_and_registered_model_that_loads_back(folder_cfg):
    uri = folder_cfg.tracking.tracking_uri
    run_id, _ = tracking.start_pretrain_run(folder_cfg)
    tracking.log_metrics(tracking.mlflow_client(uri), run_id, {"loss": 4.2}, step=3)
    backbone, _ = make_backbone("small_cnn")
    backbone.eval()
    before = mlflow.get_tracking_uri()
    model_uri = tracking.log_backbone_model(uri, run_id, backbone, 16, step=3, register_as="mocolab-backbone")
    assert mlflow.get_tracking_uri() == before  # MLflow's process-wide state is restored

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    (output,) = run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.name == "backbone" and model.source_run_id == run_id and output.step == 3
    assert model.experiment_id == run.info.experiment_id
    assert model.params["model.arch"] == "small_cnn"
    (version,) = client.search_model_versions("name='mocolab-backbone'")
    assert version.run_id == run_id

    with mlflow.tracking._tracking_service.utils._use_tracking_uri(uri):
        info = mlflow.models.get_model_info(model_uri)
        loaded = mlflow.pytorch.load_model(model_uri)
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 3, 16, 16]
    images = torch.randn(5, 3, 16, 16)  # a batch size the export never saw
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), backbone(images))


def test_a_run_shorter_than_one_sampling_interval_still_gets_system_metrics(mlflow_uri):
    client = MlflowClient(mlflow_uri)
    run_id = client.create_run(tracking.experiment_id(client, "metrics")).info.run_id
    monitor = tracking.start_system_metrics(mlflow_uri, run_id, interval_s=30)
    tracking.stop_system_metrics(monitor)  # long before the first 30 s sample
    history = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert [m.step for m in history] == [0]
    assert "system/system_memory_usage_megabytes" in client.get_run(run_id).data.metrics
    assert tracking.start_system_metrics(mlflow_uri, run_id, interval_s=0) is None  # off
