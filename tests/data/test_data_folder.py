"""Own data: ``data.dataset=folder`` (unlabeled images at any depth), the kNN monitor's and linear eval's own
labeled data, and the training-set summary MLflow records."""

from pathlib import Path

import numpy as np
import pytest
from image_folders import make_folder
from PIL import Image

from mocolab.config import ConfigError, build_config
from mocolab.data.datasets import build_pretrain_dataset
from mocolab.data.sources import folder_images, image_source, summarize
from mocolab.preflight import preflight
from mocolab.preflight.data import KNN_OFF_NOTE

CIFAR = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10-subset"


def _cfg(tmp_path, **sections):
    base = {
        "scaling": {"num_workers": 1, "storage_path": str(tmp_path / "ray_results")},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "model": {"arch": "small_cnn", "bn": "plain"},
        "train": {"batch_size": 2},
        "moco": {"queue_size": 8},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return build_config(base)


def test_folder_finds_images_at_any_depth_and_nothing_else(tmp_path):
    expected = make_folder(tmp_path / "photos")
    assert folder_images(tmp_path / "photos") == sorted(str(p) for p in expected)


def test_folder_dataset_yields_two_views_without_labels(tmp_path):
    make_folder(tmp_path / "photos")
    cfg = _cfg(tmp_path, data={"dataset": "folder", "root": str(tmp_path / "photos"), "image_size": 16})
    dataset = build_pretrain_dataset(cfg.data)
    assert len(dataset) == 6
    view_q, view_k, index = dataset[3]
    assert view_q.shape == view_k.shape == (3, 16, 16) and index == 3
    with pytest.raises(ValueError, match="no labels and no test split"):
        image_source(cfg.data, "test")


def test_folder_needs_a_root_and_images(tmp_path):
    with pytest.raises(ConfigError, match="data.root is required for data.dataset=folder"):
        _cfg(tmp_path, data={"dataset": "folder"})
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds no image files"):
        preflight(_cfg(tmp_path, data={"dataset": "folder", "root": str(tmp_path / "empty")}))


def test_without_labels_the_knn_monitor_is_off_and_says_so_once(tmp_path, capsys):
    make_folder(tmp_path / "photos")
    cfg = _cfg(tmp_path, data={"dataset": "folder", "root": str(tmp_path / "photos")})
    assert cfg.knn_data is None
    report = preflight([cfg, cfg.model_copy(deep=True)])  # a sweep's trials share the note
    out = capsys.readouterr().out
    assert report.train_images and report.notes == [KNN_OFF_NOTE]
    assert out.count("kNN monitor off") == 1 and "pre-flight checks passed (6 training images)" in out


@pytest.mark.skipif(not CIFAR.is_dir(), reason="needs ../shared/data/cifar10-subset")
def test_the_knn_monitor_takes_its_own_labeled_data(tmp_path, capsys):
    make_folder(tmp_path / "photos")
    knn = {"dataset": "imagefolder", "root": str(CIFAR), "limit_train": 20, "limit_test": 10}
    cfg = _cfg(tmp_path, data={"dataset": "folder", "root": str(tmp_path / "photos")}, train={"knn_dataset": knn})
    assert cfg.knn_data.root == str(CIFAR) and cfg.knn_data.dataset == "imagefolder"
    preflight(cfg)
    assert "kNN monitor off" not in capsys.readouterr().out
    missing = {**knn, "root": str(tmp_path / "nowhere")}
    with pytest.raises(ConfigError, match="train.knn_dataset.root="):
        preflight(_cfg(tmp_path, data={"dataset": "folder", "root": str(tmp_path / "photos")},
                       train={"knn_dataset": missing}))  # fmt: skip


def test_unlabeled_knn_or_linear_eval_data_is_refused(tmp_path):
    make_folder(tmp_path / "photos")
    folder = {"dataset": "folder", "root": str(tmp_path / "photos")}
    with pytest.raises(ConfigError, match="train.knn_dataset.dataset=folder has no labels"):
        _cfg(tmp_path, train={"knn_dataset": folder})
    with pytest.raises(ConfigError, match="data.dataset=folder has no labels.*set eval.lincls.dataset"):
        _cfg(tmp_path, data=folder, eval={"lincls": {"epochs": 1}})
    with pytest.raises(ConfigError, match="data.dataset=folder has no labels"):  # mocolab lincls on a folder config
        from mocolab.evaluate.pipeline import with_lincls

        preflight(with_lincls(_cfg(tmp_path, data=folder)), ("lincls",))
    labeled = _cfg(tmp_path, data=folder, eval={"lincls": {"dataset": {"dataset": "digits"}}})
    assert labeled.eval.lincls.dataset.dataset == "digits"


def test_summary_names_counts_and_fingerprints_the_file_list(tmp_path):
    make_folder(tmp_path / "photos")
    cfg = _cfg(tmp_path, data={"dataset": "folder", "root": str(tmp_path / "photos")})
    first = summarize(cfg.data)
    assert (first.name, first.root, first.num_images) == ("photos", str(tmp_path / "photos"), 6)
    assert summarize(cfg.data) == first
    moved = tmp_path / "moved"
    (tmp_path / "photos").rename(moved)
    assert summarize(cfg.data.model_copy(update={"root": moved})).digest == first.digest  # relative paths
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(moved / "extra.png")
    changed = summarize(cfg.data.model_copy(update={"root": moved}))
    assert changed.num_images == 7 and changed.digest != first.digest
    digits = summarize(_cfg(tmp_path, data={"limit_train": 50}).data)
    assert (digits.name, digits.root, digits.num_images) == ("digits/train", None, 50)
