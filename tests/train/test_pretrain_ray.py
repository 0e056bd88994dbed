"""Pretraining on a real local Ray (2 workers, gloo, shuffle-BN) into a real sqlite MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from mocolab import tracking
from mocolab.config import build_config
from mocolab.orchestrate import run_pretrain
from mocolab.runtime import ensure_ray
from mocolab.train.checkpoint import CHECKPOINT_FILE, load_checkpoint
from mocolab.train.launch import build_trainer, finish_pretrain_run
from mocolab.train.nonfinite import NonFiniteLossError
from mocolab.train.pretrain import INJECT_NAN_KEY

SHARED_CIFAR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10-subset"
EPOCH_METRICS = ("loss", "lr", "knn_top1", "epoch_time_s", "throughput_img_s", "corrupt_skipped")


def tiny_digits_config(tmp_path: Path, name: str, **train):
    """2 workers x 32 images, 256 training digits: 4 steps an epoch."""
    raw = {
        "moco": {"version": "v2", "dim": 32, "queue_size": 1024, "momentum": 0.99, "temperature": 0.2},
        "model": {"arch": "small_cnn", "bn": "shuffle"},
        "data": {"dataset": "digits", "image_size": 24, "loader_workers": 0, "limit_train": 256, "limit_test": 100},
        "train": {"epochs": 2, "batch_size": 32, "lr": 0.03, "knn_k": 10, "keep_checkpoints": 1, **train},
        "scaling": {"num_workers": 2, "storage_path": str(tmp_path / "ray_results")},
        "tracking": {"experiment": "test", "run_name": name, "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    return build_config(raw, base=tmp_path)


def checkpoint_dirs(cfg) -> list[Path]:
    return sorted(p for p in Path(cfg.scaling.storage_path, cfg.tracking.run_name).glob("checkpoint_*") if p.is_dir())


@pytest.mark.slow
def test_two_worker_run_lands_in_mlflow(ray_local, mlflow_uri, tmp_path):
    cfg = tiny_digits_config(tmp_path, "tiny-run")
    run_id = run_pretrain(cfg)

    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-run"
    assert run.data.tags[tracking.STAGE_TAG] == "pretrain"
    assert run.data.tags[tracking.GIT_COMMIT_TAG]
    for key in ("moco.temperature", "moco.queue_size", "model.bn", "train.lr", "scaling.num_workers", "data.dataset"):
        assert run.data.params[key] == str(cfg.flat()[key])
    for name in EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(run_id, name)] == [1, 2], name
    assert 0 <= run.data.metrics["knn_top1"] <= 100
    assert run.data.metrics["throughput_img_s"] > 0
    assert run.data.metrics[tracking.WORKER_SECONDS] > 2 * 5  # 2 workers for the fit's seconds
    assert run.data.metrics[tracking.DEVICE_HOURS] == pytest.approx(run.data.metrics[tracking.WORKER_SECONDS] / 3600)

    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "backbone.pt"} <= artifacts
    weights = torch.load(client.download_artifacts(run_id, "backbone.pt", str(tmp_path)), weights_only=True)
    assert weights and all(isinstance(v, torch.Tensor) for v in weights.values())
    assert not any(k.startswith(("encoder_", "head", "fc.")) for k in weights)

    # Ray kept only train.keep_checkpoints=1 checkpoint, the final one, loadable with weights_only
    (kept,) = checkpoint_dirs(cfg)
    state = load_checkpoint(kept)
    assert (state["epoch"], state["global_step"], state["mlflow_run_id"]) == (2, 8, run_id)
    assert len(state["rng"]) == 2  # one RNG state per worker

    # the same name again is refused before any compute: the run is finished
    with pytest.raises(tracking.RunFinishedError, match="tracking.run_name"):
        run_pretrain(cfg)


@pytest.mark.slow
def test_nonfinite_loss_stops_without_retry_and_keeps_last_good_checkpoint(ray_local, mlflow_uri, tmp_path):
    cfg = tiny_digits_config(tmp_path, "nan-run", epochs=3, max_failures=2, keep_checkpoints=3)
    run_id, _ = tracking.start_pretrain_run(cfg)
    ensure_ray()
    trainer = build_trainer(cfg, run_id)
    trainer.train_loop_config[INJECT_NAN_KEY] = 2
    result = trainer.fit()  # returns: a retryable worker failure would have been retried, then raised

    with pytest.raises(NonFiniteLossError, match="NaN/inf loss in epoch 2 at global step 4") as err:
        finish_pretrain_run(cfg, run_id, result)
    assert str(result.checkpoint.path) in str(err.value)
    assert load_checkpoint(result.checkpoint.path)["epoch"] == 1
    assert [load_checkpoint(d)["epoch"] for d in checkpoint_dirs(cfg)] == [1]
    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and "epoch 2" in run.data.tags[tracking.NONFINITE_LOSS_TAG]
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1]  # epoch 1 once: no retry


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_CIFAR.is_dir(), reason=f"{SHARED_CIFAR} is not there")
def test_two_worker_cpu_run_on_shared_cifar10_subset(ray_local, mlflow_uri, tmp_path):
    raw = {
        "moco": {"version": "v2", "queue_size": 1024, "momentum": 0.99, "temperature": 0.1},
        "model": {"arch": "resnet18", "bn": "shuffle"},
        "data": {
            "dataset": "imagefolder",
            "root": str(SHARED_CIFAR),
            "image_size": 32,
            "loader_workers": 0,
            "limit_train": 256,
            "limit_test": 100,
        },
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.03, "knn_k": 20},
        "scaling": {"num_workers": 2, "storage_path": str(tmp_path / "ray_results")},
        "tracking": {"experiment": "cifar", "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    cfg = build_config(raw, base=tmp_path)
    run_id = run_pretrain(cfg)

    run = MlflowClient(cfg.tracking.tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.root"] == str(SHARED_CIFAR)
    assert run.data.params["model.arch"] == "resnet18"
    assert set(EPOCH_METRICS) <= set(run.data.metrics)
    assert 0 <= run.data.metrics["knn_top1"] <= 100
    assert (checkpoint_dirs(cfg)[-1] / CHECKPOINT_FILE).is_file()


@pytest.mark.slow
def test_preflight_runs_once_per_command(ray_local, mlflow_uri, tmp_path, capfd, monkeypatch):
    """``mocolab pretrain`` with an evaluation: one pre-flight step in the driver, none in the Ray workers
    (their output reaches this process too), and the evaluation ran."""
    import yaml

    import mocolab.preflight
    from mocolab import cli

    calls = []
    real = mocolab.preflight.preflight
    monkeypatch.setattr(mocolab.preflight, "preflight", lambda *a, **k: calls.append(a) or real(*a, **k))
    cfg = tiny_digits_config(tmp_path, "preflight-once", epochs=1)
    raw = cfg.model_dump(mode="json")
    raw["eval"]["lincls"] = {"fast": True, "epochs": 2, "num_workers": 1}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["pretrain", str(path)]) == 0
    out = capfd.readouterr().out
    assert len(calls) == 1 and calls[0][1] == ("pretrain", "lincls")
    assert out.count("pre-flight checks passed") == 1
    assert "[mocolab lincls]" in out
