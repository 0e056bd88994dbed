"""The pre-flight step: the checks that need files, data or albumentations, run once by the driver."""

from pathlib import Path

import pytest

from mocolab.config import ConfigError, build_config
from mocolab.preflight import configured_stages, preflight

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-subset"


def _cfg(tmp_path, **sections):
    base = {
        "scaling": {"num_workers": 1, "storage_path": str(tmp_path / "ray_results")},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "model": {"arch": "small_cnn", "bn": "plain"},
        "train": {"batch_size": 16},
        "moco": {"queue_size": 64},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return build_config(base)


def refused(cfg, *fragments, stages=("pretrain",)):
    with pytest.raises(ConfigError) as err:
        preflight(cfg, stages)
    for fragment in fragments:
        assert fragment in str(err.value), f"{fragment!r} not in {str(err.value)!r}"


def test_a_good_config_passes_and_says_so_once(tmp_path, capsys):
    report = preflight(_cfg(tmp_path))
    assert list(report.train_images.values())[0] > 1000  # the made digits task
    assert capsys.readouterr().out.count("pre-flight checks passed") == 1


def test_missing_root_and_split_folders(tmp_path):
    refused(
        _cfg(tmp_path, data={"dataset": "cifar10", "root": "/no/such/dir"}), "data.root=/no/such/dir", "does not exist"
    )
    (tmp_path / "imgs" / "train").mkdir(parents=True)
    refused(_cfg(tmp_path, data={"dataset": "imagefolder", "root": str(tmp_path / "imgs")}), "data", "test")


def test_imagefolder_splits_without_class_folders_are_refused(tmp_path):
    for split in ("train", "test"):
        (tmp_path / "imgs" / split).mkdir(parents=True)
    refused(_cfg(tmp_path, data={"dataset": "imagefolder", "root": str(tmp_path / "imgs")}), "class folder")


def test_unknown_augmentation_op(tmp_path):
    refused(_cfg(tmp_path, data={"augment": [{"op": "NoSuchTransform"}]}), "data.augment", "NoSuchTransform")
    refused(_cfg(tmp_path, data={"augment": "moco_v9"}), "data.augment", "moco_v9")


def test_fewer_images_than_a_global_batch(tmp_path):
    refused(_cfg(tmp_path, data={"limit_train": 10}), "10 training images are fewer than one global batch of 16")


def test_memory_bank_k_is_checked_against_the_counted_images(tmp_path):
    cfg = _cfg(tmp_path, moco={"mechanism": "memory_bank", "queue_size": 100}, data={"limit_train": 64})
    refused(cfg, "moco.queue_size=100", "the memory bank has 64 images, so use moco.queue_size <= 48")


def test_storage_and_tracking_are_checked(tmp_path):
    (tmp_path / "file").write_text("x")
    refused(_cfg(tmp_path, scaling={"storage_path": str(tmp_path / "file")}), "scaling.storage_path", "not a folder")
    refused(_cfg(tmp_path, tracking={"tracking_uri": "sqlite:////no/such/dir/m.db"}), "/no/such/dir", "not writable")


def test_evaluation_stages_check_their_own_data(tmp_path):
    cfg = _cfg(tmp_path, eval={"lincls": {"dataset": {"dataset": "cifar10", "root": "/nope"}}})
    assert configured_stages(cfg) == ("pretrain", "lincls")
    refused(cfg, "eval.lincls.dataset.root=/nope", stages=configured_stages(cfg))
    preflight(cfg, ("pretrain",))  # the lincls dataset is not pretraining's
    det = _cfg(tmp_path, eval={"detection": {"data": {"format": "voc", "root": str(tmp_path)}}})
    refused(det, "eval.detection", stages=("detection",))


@pytest.mark.skipif(not CIFAR.is_dir(), reason="needs ../shared/data")
def test_imagefolder_on_shared_cifar_subset(tmp_path):
    cfg = _cfg(tmp_path, data={"dataset": "imagefolder", "root": str(CIFAR), "image_size": 32})
    report = preflight(cfg)
    assert list(report.train_images.values()) == [5000] and list(report.test_images.values()) == [1000]


def test_a_sweep_counts_each_data_section_once(tmp_path, monkeypatch):
    import mocolab.data.sources as sources

    calls = []
    real = sources.dataset_size
    monkeypatch.setattr(sources, "dataset_size", lambda *a, **k: calls.append(a) or real(*a, **k))
    trials = [_cfg(tmp_path, moco={"temperature": t}) for t in (0.1, 0.2, 0.3)]
    preflight(trials)
    assert len(calls) == 2  # train and test of the one data section


def _one_class_imagefolder(root: Path) -> Path:
    from PIL import Image

    for split, count in (("train", 20), ("test", 4)):
        (root / split / "cat").mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (12, 12), (i * 10, 0, 0)).save(root / split / "cat" / f"{i}.png")
    return root


def test_a_single_class_split_is_refused_for_linear_eval_and_noted_for_knn(tmp_path, capsys):
    root = _one_class_imagefolder(tmp_path / "imgs")
    data = {"dataset": "imagefolder", "root": str(root), "image_size": 12}
    refused(
        _cfg(tmp_path, data=data),
        "data.root=",
        "has 1 class folder under train/",
        "linear accuracy is meaningless",
        stages=("lincls",),
    )
    preflight(_cfg(tmp_path, data=data))
    out = capsys.readouterr().out
    assert "the kNN monitor's accuracy is meaningless" in out and "or set train.knn_every=0" in out
    preflight(_cfg(tmp_path, data=data, train={"knn_every": 0}))
    assert "meaningless" not in capsys.readouterr().out
