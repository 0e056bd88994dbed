"""MoCo v3 end to end on a real local Ray (2 workers, gloo, all-reduce BN) into a sqlite MLflow store: a tiny timm
ViT (AdamW) and small_cnn (LARS) pretrain through ``mocolab pretrain``; the ViT run is then evaluated by
``mocolab lincls --pretrain-run`` (the v3 protocol) and exported by ``mocolab export --format timm``, which timm
loads strictly."""

from __future__ import annotations

import pytest
import timm
import torch
import yaml
from mlflow import MlflowClient

from mocolab import cli, tracking

pytestmark = pytest.mark.slow

VIT = {"arch": "timm:vit_tiny_patch16_224", "timm_kwargs": {"depth": 1, "patch_size": 4}}


def _write_config(tmp_path, name: str, model: dict) -> tuple[str, str]:
    """A v3 config of 2 workers x 32 digits at 16 px, 2 steps an epoch; returns (path, tracking URI)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = {
        "moco": {"version": "v3", "dim": 32, "mlp_dim": 64},
        "model": model,
        "data": {"dataset": "digits", "image_size": 16, "loader_workers": 0, "limit_train": 128, "limit_test": 64},
        "train": {"epochs": 1, "batch_size": 32, "warmup_epochs": 0, "knn_k": 10, "keep_checkpoints": 1},
        "scaling": {"num_workers": 2, "storage_path": str(tmp_path / "ray_results")},
        "tracking": {"experiment": "v3", "run_name": name, "tracking_uri": uri},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path), uri


def _finished_pretrain_run(client: MlflowClient, name: str):
    (run,) = client.search_runs([client.get_experiment_by_name("v3").experiment_id], f"tags.mlflow.runName = '{name}'")
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.STAGE_TAG] == "pretrain"
    for metric in ("loss", "lr", "knn_top1", "throughput_img_s"):
        assert metric in run.data.metrics, metric
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1]
    return run


def test_v3_vit_pretrain_lincls_and_timm_export(ray_local, mlflow_uri, tmp_path):
    path, uri = _write_config(tmp_path, "v3-vit", VIT)
    assert cli.main(["pretrain", path]) == 0
    client = MlflowClient(uri)
    run = _finished_pretrain_run(client, "v3-vit")
    params = run.data.params
    assert (params["moco.mechanism"], params["train.optimizer"], params["model.bn"]) == ("moco_v3", "adamw", "sync")
    assert params["model.vit_freeze_patch_proj"] == "True"
    run_id = run.info.run_id

    lincls = [
        "--set",
        "eval.lincls.fast=true",
        "--set",
        "eval.lincls.epochs=2",
        "--set",
        "eval.lincls.num_workers=2",
        "--set",
        "tracking.run_name=v3-vit-lincls",
    ]
    assert cli.main(["lincls", path, "--pretrain-run", run_id, *lincls]) == 0
    lin_id = client.get_run(run_id).data.tags["mocolab.lincls_run_id"]
    lin = client.get_run(lin_id)
    assert lin.info.status == "FINISHED" and lin.data.tags[tracking.PRETRAIN_RUN_TAG] == run_id
    lin_params = {k: lin.data.params[f"eval.lincls.{k}"] for k in ("protocol", "lr", "schedule", "lr_per_256")}
    assert lin_params == {"protocol": "v3", "lr": "3.0", "schedule": "cosine", "lr_per_256": "True"}
    assert 0 <= client.get_run(run_id).data.metrics["lincls_fast_top1"] <= 100

    out = tmp_path / "vit_timm.pt"
    assert (
        cli.main(["export", "--pretrain-run", run_id, "--format", "timm", "--out", str(out), "--tracking-uri", uri])
        == 0
    )
    content = torch.load(out, weights_only=True)
    net = timm.create_model(content["model"], **content["kwargs"])
    net.load_state_dict(content["state_dict"], strict=True)
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, net.num_features)


def test_v3_resnet_style_backbone_trains_with_lars(ray_local, mlflow_uri, tmp_path):
    path, uri = _write_config(tmp_path, "v3-cnn", {"arch": "small_cnn"})
    assert cli.main(["pretrain", path]) == 0
    run = _finished_pretrain_run(MlflowClient(uri), "v3-cnn")
    assert (run.data.params["train.optimizer"], run.data.params["moco.temperature"]) == ("lars", "1.0")
