"""Torch datasets of ``data.dataset`` (imagefolder, cifar10, digits, folder) for pretraining and evaluation.

A split is first an *image source* (``data/sources.py``: in-memory arrays or image files, with integer labels),
then wrapped as a torch Dataset: two augmented views and the index for pretraining, or one transformed image and
its label for the kNN monitor and linear evaluation. Unreadable image files follow ``data.on_corrupt``:
``fail`` raises :class:`CorruptImageError` naming the file; ``skip`` yields ``None`` for the item, which
:func:`collate_skip_corrupt` drops and counts. Batches are stacked by :func:`collate_views`, which keeps the fast
path's views in the memory layout they were made in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from mocolab.config import DataConfig
from mocolab.data.augment import two_crop_transform
from mocolab.data.images import CorruptImageError, two_crops_of_file
from mocolab.data.sources import FileImages, ImageSource, image_source

MAX_AUTO_LOADER_WORKERS = 16
logger = logging.getLogger(__name__)


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
        if isinstance(self.source, FileImages):  # the transform decodes (the fast path: JPEGs by libjpeg-turbo)
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


def _interleaved(x: Any) -> bool:
    """Whether ``x`` is an image ``[C, H, W]`` whose pixels lie interleaved in memory (``[H, W, C]``, as decoded):
    the fast path's uint8 views."""
    return isinstance(x, torch.Tensor) and x.dim() == 3 and x.permute(1, 2, 0).is_contiguous()


def collate_views(items: list) -> list:
    """``default_collate`` of tuples ``(view, ..., index)``, stacking interleaved views as they lie: their batch is
    ``[N, C, H, W]`` in channels-last memory, one copy per view, where a contiguous batch would transpose each view
    in the loader worker (0.6 ms of the fast path's ~4 ms per image at 224 px, bench: ``--what data``).
    :func:`mocolab.data.normalize.normalize_views` makes the model's contiguous input on the step's device."""
    interleaved = [_interleaved(x) for x in items[0]]
    stacked = default_collate(
        [tuple(x.permute(1, 2, 0) if i else x for x, i in zip(item, interleaved)) for item in items]
    )
    return [b.permute(0, 3, 1, 2) if i else b for b, i in zip(stacked, interleaved)]


def collate_skip_corrupt(batch: list) -> tuple[Any, int]:
    """DataLoader ``collate_fn``: drop ``None`` items (skipped corrupt images) and collate the rest.

    Returns ``(collated batch or None when every item was skipped, number skipped)``."""
    kept = [item for item in batch if item is not None]
    skipped = len(batch) - len(kept)
    return (collate_views(kept) if kept else None), skipped


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
    return collate_views(filled), len(batch) - len(kept)


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
