"""Image sources of ``data.dataset`` (imagefolder, cifar10, digits, folder): a split's images (in memory or
files) with integer labels, limited by ``data.limit_train/limit_test``; counted and summarised from them."""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from mocolab.config import DataConfig
from mocolab.data import location
from mocolab.data.digits import NUM_CLASSES as DIGITS_CLASSES
from mocolab.data.digits import digits_split
from mocolab.data.images import read_rgb

SPLITS = ("train", "test")
CIFAR10_CLASSES = 10
CIFAR10_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}


class ArrayImages:
    """A split held in memory: uint8 RGB images ``[N, H, W, 3]`` and labels ``[N]``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, index: int) -> np.ndarray:
        return self.images[index]

    def subset(self, indices: np.ndarray) -> ArrayImages:
        return ArrayImages(self.images[indices], self.labels[indices])


class FileImages:
    """A split of image files, decoded on access: paths and labels ``[N]``."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray):
        self.paths, self.labels = list(paths), np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, index: int) -> np.ndarray:
        return read_rgb(self.paths[index])

    def subset(self, indices: np.ndarray) -> FileImages:
        return FileImages([self.paths[i] for i in indices], self.labels[indices])


ImageSource = ArrayImages | FileImages


# --- sources per data.dataset -----------------------------------------------------------------------


def _split_name(data_cfg: DataConfig, split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} must be one of {SPLITS} (mapped to data.train_split / data.test_split)")
    return getattr(data_cfg, f"{split}_split")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


@functools.lru_cache(maxsize=8)
def object_images(root: str) -> tuple[str, ...]:
    """Every image object under the URI ``root`` at any depth, sorted; listed once per process (hidden names
    left out, as the local walk does). A missing prefix lists as empty; an unreachable store raises OSError."""
    return tuple(uri for uri in location.list_files(root) if _is_image(uri))


def _uri_class_images(root: str, split: str) -> dict[str, list[str]]:
    """``{class folder: image URIs}`` of ``root/split/<class>/...`` in an object store (images at any depth
    below the class folder; objects directly under the split are not in a class)."""
    prefix = location.join(root, split) + "/"
    by_class: dict[str, list[str]] = {}
    for uri in object_images(root):
        if uri.startswith(prefix) and "/" in (relative := uri[len(prefix) :]):
            by_class.setdefault(relative.split("/", 1)[0], []).append(uri)
    return by_class


def _imagefolder_classes(root: str, train_split: str) -> dict[str, int]:
    if location.is_uri(root):
        names = sorted(_uri_class_images(root, train_split))
        if not names:
            raise ValueError(
                f"data.root={root}, data.train_split={train_split}: no class folders with images under "
                f"{location.join(root, train_split)}; the split folder must hold one folder per class"
            )
        return {name: i for i, name in enumerate(names)}
    try:
        return find_classes(Path(root) / train_split)[1]
    except (FileNotFoundError, NotADirectoryError) as err:
        raise ValueError(
            f"data.root={root}, data.train_split={train_split}: {err}; the split folder must hold one folder per class"
        ) from None


def _imagefolder_samples(root: str, name: str, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """``(image location, class index)`` of the split folder ``name``, in path order."""
    if location.is_uri(root):
        by_class = _uri_class_images(root, name)
        if not by_class:
            raise FileNotFoundError(
                f"no class folders with images under {location.join(root, name)}; upload the split or fix it"
            )
        return [(uri, class_to_idx[c]) for c in sorted(by_class) if c in class_to_idx for uri in by_class[c]]
    return make_dataset(Path(root) / name, class_to_idx, extensions=IMG_EXTENSIONS)


def _imagefolder_source(data_cfg: DataConfig, split: str) -> FileImages:
    """ImageNet layout ``root/<split>/<class>/<image>``; class indices come from the training split."""
    root, name = data_cfg.root, _split_name(data_cfg, split)
    class_to_idx = _imagefolder_classes(root, data_cfg.train_split)
    try:
        samples = _imagefolder_samples(root, name, class_to_idx)
    except (FileNotFoundError, NotADirectoryError) as err:
        raise ValueError(f"data.{split}_split={name} under data.root={root}: {err}") from None
    return FileImages([path for path, _ in samples], np.array([label for _, label in samples], dtype=np.int64))


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches (dicts of numpy arrays and lists) and nothing else: no code runs."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def _cifar10_dir(root: str) -> str:
    for candidate in (root, location.join(root, "cifar-10-batches-py")):
        if location.kind(location.join(candidate, "test_batch")) == "file":
            return candidate
    raise ValueError(
        f"data.root={root} holds no CIFAR-10 python batches (data_batch_1..5, test_batch), nor does "
        f"{location.join(root, 'cifar-10-batches-py')}; point data.root at the extracted cifar-10-python.tar.gz"
    )


@functools.lru_cache(maxsize=2)
def load_cifar10(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 python batches of ``split`` (train: data_batch_1..5, test: test_batch) as uint8 RGB
    images ``[N, 32, 32, 3]`` and int64 labels. Cached per process (read-only arrays)."""
    folder = _cifar10_dir(root)
    images, labels = [], []
    for name in CIFAR10_FILES[split]:
        path = location.join(folder, name)
        try:
            batch = _CifarUnpickler(io.BytesIO(location.read_bytes(path)), encoding="bytes").load()
            data, batch_labels = batch[b"data"], batch[b"labels"]
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError) as err:
            raise ValueError(f"{path} is not a readable CIFAR-10 python batch ({err}); check data.root") from None
        images.append(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch_labels, dtype=np.int64))
    out = np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)
    for array in out:
        array.setflags(write=False)
    return out


def _cifar10_source(data_cfg: DataConfig, split: str) -> ArrayImages:
    name = _split_name(data_cfg, split)
    if name not in CIFAR10_FILES:
        raise ValueError(
            f"data.{split}_split={name!r}: the CIFAR-10 python batches have splits 'train' (data_batch_1..5) "
            "and 'test' (test_batch)"
        )
    return ArrayImages(*load_cifar10(str(data_cfg.root), name))


def _digits_source(data_cfg: DataConfig, split: str) -> ArrayImages:
    name = _split_name(data_cfg, split)
    if name not in SPLITS:
        raise ValueError(f"data.{split}_split={name!r}: the digits task has splits 'train' and 'test'")
    return ArrayImages(*digits_split(data_cfg.digits, name))


def folder_images(root: Path) -> list[str]:
    """Every image file (torchvision's IMG_EXTENSIONS, any case) anywhere under ``root``, sorted; hidden files
    and folders (names starting with '.') are left out, symlinked folders are not followed."""
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        paths += [
            os.path.join(folder, name)
            for name in files
            if not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)
        ]
    return sorted(paths)


def _folder_source(data_cfg: DataConfig, split: str) -> FileImages:
    """Unlabeled images anywhere under ``data.root`` (label 0 for all); only a training split."""
    root = data_cfg.root
    if split != "train":
        raise ValueError(
            f"data.dataset=folder has no labels and no {split} split; give the kNN monitor train.knn_dataset and "
            "linear evaluation eval.lincls.dataset (labeled data sections)"
        )
    paths = list(object_images(root)) if location.is_uri(root) else folder_images(Path(root))
    if not paths:
        raise ValueError(f"data.root={root} holds no image files ({', '.join(IMG_EXTENSIONS)}) at any depth")
    return FileImages(paths, np.zeros(len(paths), dtype=np.int64))


_SOURCES: dict[str, Callable[[DataConfig, str], ImageSource]] = {
    "imagefolder": _imagefolder_source,
    "cifar10": _cifar10_source,
    "digits": _digits_source,
    "folder": _folder_source,
}


def stratified_head(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices (sorted) of a deterministic class-balanced subset of ``n`` items: the first item of every
    class, then the second of every class, and so on (classes in label order)."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(labels)) - np.searchsorted(sorted_labels, sorted_labels, side="left")
    return np.sort(np.lexsort((labels, rank))[:n])


def image_source(data_cfg: DataConfig, split: str) -> ImageSource:
    """The images and labels of ``split`` ("train" or "test"), limited by ``data.limit_train/limit_test``."""
    source = _SOURCES[data_cfg.dataset](data_cfg, split)
    limit = data_cfg.limit_train if split == "train" else data_cfg.limit_test
    if limit is not None and limit < len(source):
        source = source.subset(stratified_head(source.labels, limit))
    if len(source) == 0:
        raise ValueError(
            f"data.dataset={data_cfg.dataset}: the {split} split ({_split_name(data_cfg, split)}) is empty"
        )
    return source


def num_classes(data_cfg: DataConfig) -> int:
    """Number of classes of ``data.dataset`` (ImageFolder: class folders of the training split)."""
    if data_cfg.dataset == "folder":
        raise ValueError("data.dataset=folder has no classes; evaluate on a labeled data section")
    if data_cfg.dataset == "digits":
        return DIGITS_CLASSES
    if data_cfg.dataset == "cifar10":
        return CIFAR10_CLASSES
    return len(_imagefolder_classes(data_cfg.root, data_cfg.train_split))


def dataset_size(data_cfg: DataConfig, split: str = "train") -> int:
    """Number of items of ``split`` after ``data.limit_train/limit_test``."""
    return len(image_source(data_cfg, split))


@dataclass(frozen=True)
class DatasetSummary:
    """What identifies a training set: a name, where it lives, how many images and a digest of its contents'
    list (image files: their paths relative to the root; in-memory data: the pixels and labels)."""

    name: str
    root: str | None
    num_images: int
    digest: str


def summarize(data_cfg: DataConfig, split: str = "train") -> DatasetSummary:
    """The :class:`DatasetSummary` of ``split`` after ``data.limit_train/limit_test`` (reads the file list)."""
    source = image_source(data_cfg, split)
    sha = hashlib.sha256()
    if isinstance(source, FileImages):
        for path in source.paths:
            sha.update(location.relative(path, data_cfg.root).encode() + b"\n")
    else:
        sha.update(np.ascontiguousarray(source.images).tobytes())
        sha.update(source.labels.tobytes())
    root = str(data_cfg.root) if data_cfg.root is not None else None
    if data_cfg.dataset == "folder":
        name = Path(root).name
    else:
        base = Path(root).name if data_cfg.dataset == "imagefolder" else data_cfg.dataset
        name = f"{base}/{_split_name(data_cfg, split)}"
    return DatasetSummary(name, root, len(source), sha.hexdigest()[:16])
