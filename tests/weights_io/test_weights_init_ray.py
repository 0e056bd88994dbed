"""``model.init_weights`` end to end: a 2-worker pretraining run on Ray starts from another run's checkpoint.pt."""

from __future__ import annotations

import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from mocolab.config import build_config
from mocolab.moco.model import MoCo
from mocolab.orchestrate import run_pretrain
from mocolab.train.checkpoint import save_checkpoint


def _config(tmp_path, **model):
    raw = {
        "moco": {"dim": 32, "queue_size": 1024, "momentum": 0.99},
        "model": {"arch": "small_cnn", "bn": "shuffle", **model},
        "data": {"dataset": "digits", "image_size": 16, "loader_workers": 0, "limit_train": 256, "limit_test": 64},
        "train": {"epochs": 1, "batch_size": 32, "lr": 1e-9, "knn_every": 0, "keep_checkpoints": 1},
        "scaling": {"num_workers": 2, "storage_path": str(tmp_path / "ray_results")},
        "tracking": {"experiment": "init", "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    return build_config(raw, base=tmp_path)


@pytest.mark.slow
def test_pretraining_starts_from_init_weights(ray_local, mlflow_uri, tmp_path):
    source = MoCo.from_config(_config(tmp_path), num_train_samples=256)
    torch.manual_seed(3)
    for module in source.encoder_q.backbone.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, std=0.5)  # far from any default init
    save_checkpoint(tmp_path / "earlier", {"model": source.state_dict(), "epoch": 5})
    cfg = _config(tmp_path, init_weights=str(tmp_path / "earlier" / "checkpoint.pt"))

    run_id = run_pretrain(cfg)  # lr 1e-9: one epoch leaves the convolutions where they started

    client = MlflowClient(cfg.tracking.tracking_uri)
    assert client.get_run(run_id).data.params["model.init_weights"] == str(tmp_path / "earlier" / "checkpoint.pt")
    trained = torch.load(client.download_artifacts(run_id, "backbone.pt", str(tmp_path)), weights_only=True)
    start = source.encoder_q.backbone.state_dict()
    convs = [k for k in start if k.endswith(".0.weight")]  # features.i.0 = each block's convolution
    assert len(convs) == 4
    for key in convs:
        torch.testing.assert_close(trained[key], start[key], atol=1e-5, rtol=0)
