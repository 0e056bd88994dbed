"""Datasets of ``data.dataset`` (imagefolder, cifar10, digits, folder) for pretraining and evaluation.

A split is first an *image source* (in-memory arrays or image files, with integer labels), then wrapped
as a torch Dataset: two augmented views and the index for pretraining, or one transformed image and its
label for the kNN monitor and linear evaluation. Unreadable image files follow ``data.on_corrupt``:
``fail`` raises :class:`CorruptImageError` naming the file; ``skip`` yields ``None`` for the item, which
:func:`collate_skip_corrupt` drops and counts.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from mocolab.config import DataConfig
from mocolab.data import location
from mocolab.data.augment import two_crop_transform
from mocolab.data.digits import NUM_CLASSES as DIGITS_CLASSES
from mocolab.data.digits import digits_split
from mocolab.data.fastcrop import FastTwoCrop

SPLITS = ("train", "test")
CIFAR10_CLASSES = 10
CIFAR10_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
MAX_AUTO_LOADER_WORKERS = 16
logger = logging.getLogger(__name__)


_SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I")  # PIL's modes of 16-bit greyscale PNG / TIFF files


class CorruptImageError(RuntimeError):
    """An image file that cannot be decoded; the message names the file and ``data.on_corrupt``."""


# --- reading images ---------------------------------------------------------------------------------


def _corrupt(where: str | Path, err: Exception) -> CorruptImageError:
    return CorruptImageError(
        f"cannot read image {where}: {err}; replace or remove the file, or set data.on_corrupt=skip "
        "to skip unreadable images (they are counted as corrupt_skipped)"
    )


def decode_rgb(data: bytes, where: str | Path) -> np.ndarray:
    """Decode an encoded image to a uint8 RGB array ``[H, W, 3]`` (greyscale, palette, CMYK and RGBA converted by
    PIL; 16-bit greyscale scaled to 8 bits, where PIL's conversion would clip it to white).

    Raises CorruptImageError naming ``where`` (the file's location) for a truncated or undecodable image. Every
    pipeline decodes other than baseline JPEGs through this function (``data/encoded.py``)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.mode in _SIXTEEN_BIT_GREY:
                grey = (np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
                return np.repeat(grey[:, :, None], 3, axis=2)
            return np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as err:  # PIL's ways of saying "not a readable image"
        raise _corrupt(where, err) from None


def read_encoded(path: str | Path) -> bytes:
    """The bytes of the image file at ``path`` (a local path or an object-store URI); CorruptImageError if missing."""
    try:
        return location.read_bytes(str(path))
    except OSError as err:  # missing, unreadable, or gone from the store since the listing
        raise _corrupt(path, err) from None


def read_rgb(path: str | Path) -> np.ndarray:
    """Read and decode the image at ``path`` (a local path or an object-store URI), as :func:`decode_rgb`.

    Raises CorruptImageError for a missing, truncated or undecodable file."""
    return decode_rgb(read_encoded(path), path)


def two_crops_of_file(transform: Callable, path: str | Path) -> tuple[Any, Any]:
    """The two views of the image file at ``path``: straight from its bytes on the fast path (which decodes a JPEG
    at the scale its crops allow), else decoded by :func:`decode_rgb` first. CorruptImageError as :func:`read_rgb`."""
    data = read_encoded(path)
    views = transform.from_encoded(data) if isinstance(transform, FastTwoCrop) else None
    return views if views is not None else transform(decode_rgb(data, path))


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


# --- torch datasets ---------------------------------------------------------------------------------


class _SourceDataset(Dataset):
    """Images of ``source`` through ``transform``; ``data.on_corrupt`` decides what an unreadable one does."""

    def __init__(self, source: ImageSource, transform: Callable, on_corrupt: str):
        self.source, self.transform, self.on_corrupt = source, transform, on_corrupt

    def __len__(self) -> int:
        return len(self.source)

    def _read(self, index: int) -> np.ndarray | None:
        try:
            return self.source.read(index)
        except CorruptImageError as err:
            return self._skip_or_raise(err)

    def _skip_or_raise(self, err: CorruptImageError) -> None:
        if self.on_corrupt == "skip":
            logger.warning("data.on_corrupt=skip, skipped: %s", err)
            return None
        raise err


class TwoCropDataset(_SourceDataset):
    """Pretraining items ``(view_q, view_k, index)`` (uint8 views on the fast path, see
    :func:`mocolab.data.augment.two_crop_transform`); ``None`` for a skipped corrupt image."""

    def __getitem__(self, index: int):
        if isinstance(self.source, FileImages):  # the transform decodes (the fast path: at a reduced scale)
            try:
                view_q, view_k = two_crops_of_file(self.transform, self.source.paths[index])
            except CorruptImageError as err:
                return self._skip_or_raise(err)
            return view_q, view_k, index
        view_q, view_k = self.transform(self.source.read(index))
        return view_q, view_k, index


class LabeledDataset(_SourceDataset):
    """Evaluation items ``(transform(image), label)``; ``None`` for a skipped corrupt image."""

    def __getitem__(self, index: int):
        image = self._read(index)
        if image is None:
            return None
        return self.transform(image), int(self.source.labels[index])


def build_pretrain_dataset(data_cfg: DataConfig) -> TwoCropDataset:
    """The training split with MoCo's two-crop ``data.augment`` policy at ``data.image_size``."""
    transform = two_crop_transform(data_cfg.augment, data_cfg.image_size)
    return TwoCropDataset(image_source(data_cfg, "train"), transform, data_cfg.on_corrupt)


def build_labeled_dataset(data_cfg: DataConfig, split: str, transform: Callable) -> LabeledDataset:
    """``(transform(image), label)`` items of ``split`` ("train" -> data.train_split, "test" -> data.test_split)."""
    return LabeledDataset(image_source(data_cfg, split), transform, data_cfg.on_corrupt)


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


def collate_skip_corrupt(batch: list) -> tuple[Any, int]:
    """DataLoader ``collate_fn``: drop ``None`` items (skipped corrupt images) and collate the rest.

    Returns ``(collated batch or None when every item was skipped, number skipped)``."""
    kept = [item for item in batch if item is not None]
    skipped = len(batch) - len(kept)
    return (default_collate(kept) if kept else None), skipped


def collate_keep_batch_size(batch: list) -> tuple[Any, int]:
    """Pretraining ``collate_fn``: like :func:`collate_skip_corrupt`, but the places of skipped images are
    filled with repeats of kept items, so that every batch keeps its size on every rank (MoCo's queue and
    the cross-worker gathers need equal batches). Returns ``(collated batch, number skipped)``."""
    kept = [item for item in batch if item is not None]
    if not kept:
        raise CorruptImageError(
            f"all {len(batch)} images of a batch are unreadable (data.on_corrupt=skip); check data.root"
        )
    filled = kept + [kept[i % len(kept)] for i in range(len(batch) - len(kept))]
    return default_collate(filled), len(batch) - len(kept)


# --- DataLoader sizing ------------------------------------------------------------------------------


def resolve_loader_workers(data_cfg: DataConfig, cpus_per_worker: float) -> int:
    """DataLoader worker processes for one training worker: ``data.loader_workers``, or for "auto" one
    fewer than the worker's CPUs (the training process keeps one), 0 on a 1-CPU worker, at most 16."""
    if data_cfg.loader_workers != "auto":
        return int(data_cfg.loader_workers)  # the schema refuses negative counts
    return max(0, min(int(cpus_per_worker) - 1, MAX_AUTO_LOADER_WORKERS))


def loader_kwargs(data_cfg: DataConfig, cpus_per_worker: float, use_gpu: bool) -> dict[str, Any]:
    """DataLoader keyword arguments sized for the worker: ``num_workers``, ``pin_memory`` (GPU only) and,
    with worker processes, ``persistent_workers`` and ``prefetch_factor``."""
    workers = resolve_loader_workers(data_cfg, cpus_per_worker)
    kwargs: dict[str, Any] = {"num_workers": workers, "pin_memory": use_gpu}
    if workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=4)
    return kwargs
