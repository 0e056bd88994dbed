"""Bad input at the level of a whole `mocolab pretrain` run: nothing is lost, the message says what and where.

- an unreachable MLflow server fails before any compute, naming the URI;
- a read-only storage path fails before any compute, naming scaling.storage_path;
- corrupt images (a truncated PNG, a file that is no image) on 2 Ray workers: data.on_corrupt=skip
  finishes the run, counts them (MLflow metric corrupt_skipped) and reports their paths;
  data.on_corrupt=fail fails the run with the path in the error and the MLflow run marked FAILED;
  skipped images are replaced by repeats of kept ones, so batches stay equal across workers.
"""

from __future__ import annotations

import logging
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from mocolab import cli
from mocolab.config import build_config
from mocolab.data.datasets import TwoCropDataset, collate_keep_batch_size
from mocolab.data.images import CorruptImageError
from mocolab.data.sources import FileImages
from mocolab.orchestrate import run_pretrain

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = str(REPO / "experiments" / "pretrain" / "quickstart.yaml")
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10-subset"
needs_cifar = pytest.mark.skipif(not SHARED_CIFAR.is_dir(), reason=f"{SHARED_CIFAR} is not there")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # free once the socket closes: nothing listens there


def test_unreachable_mlflow_server_fails_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    code = cli.main(["pretrain", QUICKSTART, "--set", f"tracking.tracking_uri={uri}",
                     "--set", f"scaling.storage_path={tmp_path / 'ray_results'}"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert f"MLflow tracking server {uri} is unreachable" in err
    assert "MLFLOW_TRACKING_URI" in err  # the fix
    assert time.monotonic() - started < 30
    assert not any((tmp_path / "ray_results").iterdir())  # no Ray run was started


def test_unusable_storage_path_fails_before_training(tmp_path, monkeypatch, capsys, mlflow_uri):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the storage folder should be")
    code = cli.main(["pretrain", QUICKSTART, "--set", f"scaling.storage_path={blocker / 'ray_results'}"])
    assert code == 2
    assert f"scaling.storage_path={blocker / 'ray_results'}" in capsys.readouterr().err
    assert MlflowClient(mlflow_uri).search_experiments(filter_string="name = 'quickstart'") == []  # no run made


def test_pretraining_batches_keep_their_size_when_images_are_skipped():
    item = (torch.zeros(3, 4, 4), torch.ones(3, 4, 4), 7)
    (view_q, view_k, index), skipped = collate_keep_batch_size([item, None, item, None])
    assert skipped == 2 and view_q.shape == (4, 3, 4, 4) and index.tolist() == [7, 7, 7, 7]
    with pytest.raises(CorruptImageError, match="all 2 images of a batch are unreadable"):
        collate_keep_batch_size([None, None])


def test_skipped_image_is_logged_with_its_path(tmp_path, caplog):
    bad = tmp_path / "train" / "cat" / "broken.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not an image")
    dataset = TwoCropDataset(FileImages([str(bad)], np.zeros(1)), transform=None, on_corrupt="skip")
    with caplog.at_level(logging.WARNING, logger="mocolab.data.datasets"):
        assert dataset[0] is None
    assert str(bad) in caplog.text and "data.on_corrupt=skip" in caplog.text


def corrupt_imagefolder(root: Path) -> list[Path]:
    """2 classes x 64 training and x 10 test images from the shared CIFAR-10 subset; two of the training
    files corrupted. Returns the corrupted paths."""
    for split, count in (("train", 64), ("test", 10)):
        for cls in ("cat", "dog"):
            target = root / split / cls
            target.mkdir(parents=True)
            for path in sorted((SHARED_CIFAR / split / cls).iterdir())[:count]:
                shutil.copy(path, target / path.name)
    truncated, garbage = sorted((root / "train" / "cat").iterdir())[:2]
    truncated.write_bytes(truncated.read_bytes()[:100])
    garbage.write_bytes(b"this is not an image")
    return [truncated, garbage]


def corrupt_run_config(tmp_path: Path, root: Path, on_corrupt: str):
    raw = {
        "moco": {"dim": 32, "queue_size": 256, "momentum": 0.99},
        "model": {"arch": "small_cnn", "bn": "shuffle"},
        "data": {
            "dataset": "imagefolder",
            "root": str(root),
            "image_size": 32,
            "loader_workers": 0,
            "on_corrupt": on_corrupt,
        },  # fmt: skip
        "train": {"epochs": 1, "batch_size": 32, "knn_k": 10},  # 128 images: 2 steps on each of 2 workers
        "scaling": {"num_workers": 2, "storage_path": str(tmp_path / "ray_results")},
        "tracking": {
            "experiment": "corrupt",
            "run_name": f"corrupt-{on_corrupt}",
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        },  # fmt: skip
    }
    return build_config(raw, base=tmp_path)


@pytest.mark.slow
@needs_cifar
def test_corrupt_images_are_skipped_counted_and_reported(ray_local, mlflow_uri, tmp_path, capfd):
    bad = corrupt_imagefolder(tmp_path / "images")
    cfg = corrupt_run_config(tmp_path, tmp_path / "images", "skip")
    run_id = run_pretrain(cfg)

    client = MlflowClient(cfg.tracking.tracking_uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "corrupt_skipped")] == [(1, 2.0)]
    deadline = time.monotonic() + 15  # worker output reaches the driver asynchronously
    output = ""
    while not all(str(path) in output for path in bad) and time.monotonic() < deadline:
        time.sleep(0.5)
        output += "".join(capfd.readouterr())
    for path in bad:
        assert str(path) in output, f"skipped image {path} was not reported"


@pytest.mark.slow
@needs_cifar
def test_corrupt_image_fails_the_run_naming_it(ray_local, mlflow_uri, tmp_path):
    bad = corrupt_imagefolder(tmp_path / "images")
    cfg = corrupt_run_config(tmp_path, tmp_path / "images", "fail")
    with pytest.raises(Exception) as err:
        run_pretrain(cfg)
    message = str(err.value)
    assert any(str(path) in message for path in bad), message[-2000:]
    assert "data.on_corrupt=skip" in message  # the way out
    client = MlflowClient(cfg.tracking.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("corrupt").experiment_id])
    assert run.info.status == "FAILED"
