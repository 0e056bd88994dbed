"""Pretraining on a folder of unlabeled images (any nesting) on a real local Ray, the kNN monitor on its own
labeled data, and what MLflow then holds: system metrics, the dataset input and the logged model."""

from __future__ import annotations

import json

import pytest
from image_folders import make_folder
from mlflow import MlflowClient

from mocolab import tracking
from mocolab.config import build_config
from mocolab.orchestrate import run_pretrain


@pytest.mark.slow
def test_pretraining_on_a_folder_of_images(ray_local, mlflow_uri, tmp_path):
    make_folder(tmp_path / "photos", n=64)
    cfg = build_config({
        "moco": {"dim": 32, "queue_size": 64},
        "model": {"arch": "small_cnn", "bn": "shuffle"},
        "data": {"dataset": "folder", "root": str(tmp_path / "photos"), "image_size": 16, "loader_workers": 0},
        "train": {"epochs": 2, "batch_size": 16, "knn_k": 5,
                  "knn_dataset": {"dataset": "digits", "image_size": 16, "limit_train": 100, "limit_test": 50}},
        "scaling": {"num_workers": 2, "storage_path": str(tmp_path / "ray_results")},
        "tracking": {"experiment": "folder", "run_name": "folder-run", "system_metrics_interval_s": 1},
    })  # fmt: skip
    run_id = run_pretrain(cfg)

    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run_id, "knn_top1")] == [1, 2]  # on digits, its own data
    system = {name for name in run.data.metrics if name.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "photos" and json.loads(dataset_input.dataset.profile) == {"num_images": 64}
    (output,) = run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.name == tracking.BACKBONE_MODEL and model.source_run_id == run_id and output.step == 2
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.yaml", "backbone.pt"}
