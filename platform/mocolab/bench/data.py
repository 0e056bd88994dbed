"""Data pipeline throughput: images/s one DataLoader worker process turns out (decode, two-crop augment,
collate), timed in alternation with the step it feeds.

Measured in this process with one thread for torch and OpenCV, like a DataLoader worker (torch gives each
worker one thread; OpenCV is pinned here as well so that the number is per worker process, not per machine).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import cv2
import torch
from torch.utils.data import DataLoader, RandomSampler

from mocolab.data.datasets import build_pretrain_dataset, collate_skip_corrupt


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run the block with one torch and one OpenCV thread, restoring both after."""
    torch_threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        cv2.setNumThreads(cv2_threads)


def data_contender(data_cfg, batch_size: int, seed: int = 0) -> Callable[[], object]:
    """A callable that loads one batch of ``batch_size`` random training images of ``data_cfg``'s pretraining
    pipeline (decode, two crops, collate) on one thread, for ``timing.interleaved_rates``."""
    dataset = build_pretrain_dataset(data_cfg)
    sampler = RandomSampler(
        dataset, replacement=True, num_samples=sys.maxsize, generator=torch.Generator().manual_seed(seed)
    )
    batches = iter(
        DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=0,
            collate_fn=collate_skip_corrupt,
            drop_last=True,
        )
    )

    def load_batch() -> object:
        with single_threaded():
            return next(batches)

    return load_batch
