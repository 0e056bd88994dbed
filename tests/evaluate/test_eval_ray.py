"""End to end on Ray Train: linear eval (full and fast) and detection transfer, filed in MLflow and
linked to a pretraining run (a run made as ``run_pretrain`` leaves it: config.yaml + backbone.pt)."""

from __future__ import annotations

import re

import pytest
import torch
from mlflow import MlflowClient

from mocolab import tracking
from mocolab.config import build_config
from mocolab.data.detection import make_digits_voc
from mocolab.evaluate.pipeline import run_configured_evals, run_lincls, run_random_baselines
from mocolab.evaluate.runner import eval_params, run_eval
from mocolab.evaluate.weights import resolve_source
from mocolab.moco.backbones import backbone_state_dict, build_backbone
from mocolab.train.nonfinite import INJECT_NAN_STEP_KEY, NonFiniteLossError

pytestmark = pytest.mark.slow


def _config(tmp_path, uri, **evals):
    return build_config(
        {
            "model": {"arch": "small_cnn", "bn": "plain"},
            "data": {"dataset": "digits", "image_size": 24, "limit_train": 192, "limit_test": 96, "loader_workers": 0},
            "moco": {"queue_size": 1024},
            "train": {"batch_size": 64},
            "scaling": {"num_workers": 1, "storage_path": str(tmp_path / "ray")},
            "tracking": {"tracking_uri": uri, "experiment": "eval-test", "run_name": "pre"},
            "eval": evals,
        }
    )


def _fake_pretraining_run(cfg, tmp_path) -> str:
    run_id, _ = tracking.start_pretrain_run(cfg)
    torch.manual_seed(3)
    backbone, _ = build_backbone(cfg.model)
    path = tmp_path / "backbone.pt"
    torch.save(backbone_state_dict(backbone), path)
    tracking.log_file(cfg.tracking.tracking_uri, run_id, path)
    tracking.end_run(cfg.tracking.tracking_uri, run_id)
    return run_id


def test_lincls_full_and_fast_on_ray(ray_local, mlflow_uri, tmp_path):
    lincls = {"epochs": 2, "batch_size": 64, "lr": 1.0, "num_workers": 2}
    cfg = _config(tmp_path, mlflow_uri, lincls=lincls)
    pretrain_id = _fake_pretraining_run(cfg, tmp_path)

    metrics = run_configured_evals(cfg, pretrain_id)["lincls"]
    assert 0 <= metrics["lincls_top1"] <= metrics["lincls_top5"] <= 100
    client = MlflowClient(mlflow_uri)
    run = client.get_run(metrics["run_id"])
    assert run.data.tags[tracking.STAGE_TAG] == "lincls"
    assert run.data.tags[tracking.PRETRAIN_RUN_TAG] == pretrain_id
    assert run.data.tags[tracking.INIT_TAG] == "pretrain"
    assert run.data.params["eval.lincls.lr"] == "1.0" and run.data.params["eval.lincls.dataset.dataset"] == "digits"
    # compute accounting: 2 workers x 1 CPU for the fit's wall time
    assert run.data.metrics[tracking.DEVICE_HOURS] == pytest.approx(run.data.metrics[tracking.WORKER_SECONDS] / 3600)
    assert run.data.metrics[tracking.WORKER_SECONDS] > 2 * 5  # a Ray Train fit takes seconds on each worker
    pretrain = client.get_run(pretrain_id)
    assert pretrain.data.metrics["lincls_top1"] == pytest.approx(metrics["lincls_top1"])
    assert pretrain.data.tags["mocolab.lincls_run_id"] == metrics["run_id"]

    fast_cfg = _config(tmp_path, mlflow_uri, lincls={**lincls, "fast": True})
    fast = run_lincls(fast_cfg, resolve_source(fast_cfg, init="random"))
    assert 0 <= fast["lincls_fast_top1"] <= fast["lincls_fast_top5"] <= 100
    run = client.get_run(fast["run_id"])
    assert run.data.tags[tracking.INIT_TAG] == "random" and tracking.PRETRAIN_RUN_TAG not in run.data.tags


def test_detection_on_two_ray_workers(ray_local, mlflow_uri, tmp_path):
    root = make_digits_voc(tmp_path / "digits-voc", num_train=8, num_val=4)
    detection = {
        "data": {"format": "voc", "root": str(root)},
        "fpn": False,
        "min_size": 64,
        "max_size": 64,
        "anchor_sizes": [8, 16, 32, 64],
        "iterations": 3,
        "warmup_iters": 1,
        "batch_size": 2,
        "lr": 0.01,
        "roi_batch_size": 32,
        "test_proposals": 20,
        "num_workers": 2,
    }
    cfg = _config(tmp_path, mlflow_uri, detection=detection)
    pretrain_id = _fake_pretraining_run(cfg, tmp_path)

    metrics = run_configured_evals(cfg, pretrain_id)["detection"]
    for name in ("det_AP", "det_AP50", "det_AP75"):
        assert 0 <= metrics[name] <= 100
    assert metrics["det_AP50"] >= metrics["det_AP75"]
    client = MlflowClient(mlflow_uri)
    assert client.get_run(metrics["run_id"]).data.tags[tracking.STAGE_TAG] == "detection"
    pretrain = client.get_run(pretrain_id)
    assert pretrain.data.tags["mocolab.detection_run_id"] == metrics["run_id"]
    assert set(pretrain.data.metrics) >= {"det_AP", "det_AP50", "det_AP75"}

    baseline = run_random_baselines(cfg)["detection"]
    assert client.get_run(baseline["run_id"]).data.tags[tracking.INIT_TAG] == "random"


def _nonfinite_run(cfg, stage, loop, section, workers, headline, fix, step):
    """``run_eval`` with the last worker's loss made NaN at ``step`` (rank 0, which files the tag, learns it only
    through the all-reduce); returns the error and the evaluation's MLflow run."""
    source = resolve_source(cfg, init="random")
    loop_config = {"config": cfg.model_dump(mode="json"), INJECT_NAN_STEP_KEY: step}
    with pytest.raises(NonFiniteLossError) as err:
        run_eval(
            cfg, source, stage, eval_params(cfg, stage, section, source), loop, loop_config, workers, headline, fix
        )
    run_id = re.search(r"\(MLflow run (\w+)\)", str(err.value)).group(1)
    return str(err.value), MlflowClient(cfg.tracking.tracking_uri).get_run(run_id)


def test_nonfinite_detection_loss_stops_both_workers_and_fails_the_run(ray_local, mlflow_uri, tmp_path):
    from mocolab.evaluate.detection import detection_train_loop
    from mocolab.evaluate.pipeline import DETECTION_NONFINITE_FIX as NONFINITE_FIX
    from mocolab.tracking.names import DETECTION_METRICS

    root = make_digits_voc(tmp_path / "digits-voc", num_train=8, num_val=4)
    detection = {
        "data": {"format": "voc", "root": str(root)},
        "fpn": False,
        "bn": "sync",  # the all-reduce BN inside DDP on two gloo workers
        "min_size": 64,
        "max_size": 64,
        "anchor_sizes": [8, 16, 32, 64],
        "iterations": 4,
        "warmup_iters": 2,
        "roi_batch_size": 32,
        "test_proposals": 20,
        "num_workers": 2,
    }
    cfg = _config(tmp_path, mlflow_uri, detection=detection)
    message, run = _nonfinite_run(
        cfg, "detection", detection_train_loop, cfg.eval.detection, 2, DETECTION_METRICS, NONFINITE_FIX, step=3
    )

    assert "\n" not in message
    assert re.fullmatch(
        r"detection run 'detection-random-pre' \(MLflow run \w+\): NaN/inf loss nan at iteration 3/4 "
        r"\(worker 0: classifier [^)]*\); stopped without retry\. " + re.escape(NONFINITE_FIX),
        message,
    ), message
    assert run.info.status == "FAILED"
    assert run.data.tags[tracking.NONFINITE_LOSS_TAG].startswith("loss nan at iteration 3/4 (")
    assert "det_AP" not in run.data.metrics
    history = MlflowClient(mlflow_uri).get_metric_history(run.info.run_id, "iter_loss")
    assert [m.step for m in history] == [1, 2]  # logged every iteration of this short run, up to the NaN


def test_nonfinite_lincls_loss_fails_the_run(ray_local, mlflow_uri, tmp_path):
    from mocolab.evaluate.lincls import lincls_train_loop, metric_names

    lincls = {"epochs": 2, "batch_size": 64, "lr": 1.0, "num_workers": 2, "fast": True}
    cfg = _config(tmp_path, mlflow_uri, lincls=lincls)
    message, run = _nonfinite_run(
        cfg, "lincls", lincls_train_loop, cfg.eval.lincls, 2, metric_names(True), "Lower eval.lincls.lr.", step=3
    )

    assert re.fullmatch(
        r"lincls run 'lincls-random-pre' \(MLflow run \w+\): NaN/inf loss nan in epoch 2 at step 3; "
        r"stopped without retry\. Lower eval\.lincls\.lr\.",
        message,
    ), message
    assert run.info.status == "FAILED" and "lincls_fast_top1" not in run.data.metrics
