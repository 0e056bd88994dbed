"""Datasets: ImageFolder on the shared CIFAR-10 subset, CIFAR-10 python batches, digits, corrupt files,
greyscale images, limits, loader sizing."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mocolab.config import DataConfig
from mocolab.data.augment import eval_transform
from mocolab.data.datasets import (
    build_labeled_dataset,
    build_pretrain_dataset,
    collate_skip_corrupt,
    collate_views,
    loader_kwargs,
    resolve_loader_workers,
)
from mocolab.data.images import CorruptImageError, read_rgb
from mocolab.data.sources import dataset_size, load_cifar10, num_classes, stratified_head

SUBSET = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "cifar10-subset"
needs_subset = pytest.mark.skipif(not SUBSET.is_dir(), reason="../shared/data/cifar10-subset is not present")
CLASSES = ("airplane", "automobile", "bird")


def _copy_subset(dst: Path, per_class: int = 4) -> Path:
    """A small ImageFolder (train/test, 3 classes) of real CIFAR-10 PNGs under ``dst``."""
    for split in ("train", "test"):
        for cls in CLASSES:
            (dst / split / cls).mkdir(parents=True)
            for name in sorted(os.listdir(SUBSET / split / cls))[:per_class]:
                shutil.copy(SUBSET / split / cls / name, dst / split / cls / name)
    return dst


@needs_subset
def test_imagefolder_on_shared_subset_with_limits():
    cfg = DataConfig(dataset="imagefolder", root=SUBSET, limit_train=30, limit_test=20, image_size=32)
    pretrain = build_pretrain_dataset(cfg)
    assert len(pretrain) == dataset_size(cfg) == 30
    view_q, view_k, index = pretrain[7]
    assert view_q.shape == view_k.shape == (3, 32, 32) and index == 7
    assert np.bincount(pretrain.source.labels).tolist() == [3] * 10  # class-balanced limit
    test = build_labeled_dataset(cfg, "test", eval_transform(32))
    image, label = test[0]
    assert image.shape == (3, 32, 32) and isinstance(label, int)
    assert len(test) == 20 and num_classes(cfg) == 10


@needs_subset
def test_split_names_come_from_config(tmp_path):
    root = _copy_subset(tmp_path / "set")
    (root / "test").rename(root / "val")
    cfg = DataConfig(dataset="imagefolder", root=root, test_split="val")
    assert len(build_labeled_dataset(cfg, "test", eval_transform(32))) == 3 * 4
    assert num_classes(cfg) == 3


def test_stratified_head_interleaves_classes():
    labels = np.array([0, 0, 0, 0, 1, 1, 2])
    assert stratified_head(labels, 5).tolist() == [0, 1, 4, 5, 6]
    assert stratified_head(labels, 100).tolist() == list(range(7))


@needs_subset
def test_truncated_png_fails_with_its_path(tmp_path):
    root = _copy_subset(tmp_path / "set")
    bad = root / "train" / "bird" / sorted(os.listdir(root / "train" / "bird"))[0]
    bad.write_bytes(bad.read_bytes()[:200])
    dataset = build_pretrain_dataset(DataConfig(dataset="imagefolder", root=root, on_corrupt="fail"))
    with pytest.raises(CorruptImageError, match=rf"{bad}.*data\.on_corrupt=skip"):
        for i in range(len(dataset)):
            dataset[i]


@needs_subset
def test_corrupt_images_are_skipped_and_counted(tmp_path):
    root = _copy_subset(tmp_path / "set")
    files = sorted((root / "train" / "bird").iterdir())
    files[0].write_bytes(files[0].read_bytes()[:200])  # truncated
    files[1].write_bytes(b"not an image at all")  # undecodable
    dataset = build_pretrain_dataset(DataConfig(dataset="imagefolder", root=root, on_corrupt="skip"))
    loader = DataLoader(dataset, batch_size=len(dataset), collate_fn=collate_skip_corrupt)
    (view_q, view_k, index), skipped = next(iter(loader))
    assert skipped == 2
    assert view_q.shape == (len(dataset) - 2, 3, 32, 32)
    assert len(set(index.tolist())) == len(dataset) - 2


def test_collate_of_only_skipped_items():
    assert collate_skip_corrupt([None, None]) == (None, 2)


def test_greyscale_and_rgba_files_are_read_as_rgb(tmp_path):
    grey = np.arange(48 * 40, dtype=np.uint32).reshape(48, 40) % 256
    Image.fromarray(grey.astype(np.uint8), mode="L").save(tmp_path / "grey.png")
    Image.fromarray(np.zeros((10, 12, 4), np.uint8), mode="RGBA").save(tmp_path / "rgba.png")
    rgb = read_rgb(tmp_path / "grey.png")
    assert rgb.shape == (48, 40, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 0] == grey).all() and (rgb[..., 1] == grey).all()
    assert read_rgb(tmp_path / "rgba.png").shape == (10, 12, 3)
    with pytest.raises(CorruptImageError, match="missing.png"):
        read_rgb(tmp_path / "missing.png")


def _write_cifar_batches(root: Path, images: np.ndarray, labels: list[int]) -> None:
    """CIFAR-10's python format: pickled dicts with bytes keys, data as [N, 3072] channel-planar rows."""
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        part = slice(2 * i, 2 * i + 2)
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels[part],
            b"data": rows[part],
            b"filenames": [b"x.png"] * len(labels[part]),
        }
        with open(root / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)


@needs_subset
def test_cifar10_python_batches(tmp_path):
    paths = sorted((SUBSET / "train" / "airplane").iterdir())[:6] + sorted((SUBSET / "train" / "bird").iterdir())[:6]
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    labels = [0, 2] * 6
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    _write_cifar_batches(root, images, labels)
    cfg = DataConfig(dataset="cifar10", root=tmp_path, image_size=32)  # the parent folder works too
    train = build_labeled_dataset(cfg, "train", eval_transform(32))
    assert len(train) == 10 and num_classes(cfg) == 10
    x, y = load_cifar10(str(tmp_path), "train")
    assert np.array_equal(x, images[:10]) and y.tolist() == labels[:10]
    assert np.array_equal(load_cifar10(str(root), "test")[0], images[10:])
    assert build_pretrain_dataset(cfg)[3][0].shape == (3, 32, 32)


def test_cifar10_refuses_pickles_that_run_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    for name in ("test_batch", "data_batch_1"):
        (tmp_path / name).write_bytes(pickle.dumps({b"data": Exploit(), b"labels": []}))
    with pytest.raises(ValueError, match="not allowed"):
        load_cifar10(str(tmp_path), "test")


def test_cifar10_missing_batches_name_the_root(tmp_path):
    cfg = DataConfig(dataset="cifar10", root=tmp_path)
    with pytest.raises(ValueError, match=rf"data\.root={tmp_path}"):
        build_pretrain_dataset(cfg)


def test_digits_datasets():
    cfg = DataConfig(dataset="digits", image_size=24, limit_test=100)
    pretrain = build_pretrain_dataset(cfg)
    view_q, view_k, index = pretrain[5]
    assert view_q.shape == (3, 24, 24) and index == 5
    test = build_labeled_dataset(cfg, "test", eval_transform(24))
    assert len(test) == 100 and num_classes(cfg) == 10
    assert not torch.equal(view_q, view_k)


def test_unknown_split_argument_is_refused():
    with pytest.raises(ValueError, match="train.*test"):
        build_labeled_dataset(DataConfig(), "val", eval_transform(32))


@pytest.mark.parametrize(
    "setting, cpus, expected",
    [("auto", 1, 0), ("auto", 0.5, 0), ("auto", 2, 1), ("auto", 8, 7), ("auto", 64, 16), (3, 1, 3)],
)
def test_loader_workers(setting, cpus, expected):
    assert resolve_loader_workers(DataConfig(loader_workers=setting), cpus) == expected


def test_negative_loader_workers_are_refused():
    with pytest.raises(ValueError, match="data.loader_workers=-1"):
        resolve_loader_workers(DataConfig(loader_workers=-1), 4)


def test_loader_kwargs():
    assert loader_kwargs(DataConfig(), 1, use_gpu=False) == {"num_workers": 0, "pin_memory": False}
    gpu = loader_kwargs(DataConfig(), 10, use_gpu=True)
    assert gpu["num_workers"] == 9 and gpu["pin_memory"] and gpu["persistent_workers"] and gpu["prefetch_factor"] >= 2


def test_interleaved_views_are_stacked_as_they_lie_and_labelled_images_as_before():
    rng = np.random.default_rng(0)
    made = [torch.from_numpy(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).permute(2, 0, 1) for _ in range(6)]
    items = [(made[i], made[i + 3], i) for i in range(3)]  # the fast path's (view_q, view_k, index)
    view_q, view_k, index = collate_views(items)
    assert view_q.shape == (3, 3, 8, 8) and view_q.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(view_q, torch.stack(made[:3])) and torch.equal(view_k, torch.stack(made[3:]))
    assert index.tolist() == [0, 1, 2]
    labelled = [(torch.rand(3, 8, 8), i) for i in range(3)]  # eval transforms: contiguous float images
    images, labels = collate_views(labelled)
    assert images.is_contiguous() and torch.equal(images, torch.stack([x for x, _ in labelled]))
