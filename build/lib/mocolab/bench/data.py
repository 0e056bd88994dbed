"""Data pipeline throughput: images/s one DataLoader worker process turns out (decode, two-crop augment,
collate), compared with what the step consumes.

Measured in this process with one thread for torch and OpenCV, like a DataLoader worker (torch gives each
worker one thread; OpenCV is pinned here as well so that the number is per worker process, not per machine).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

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


def data_throughput(data_cfg, batch_size: int, images: int = 512, seed: int = 0) -> float:
    """Images/s of ``data_cfg``'s pretraining pipeline in one worker process: ``images`` random training
    images (at least one batch) decoded, augmented twice and collated, after one untimed warm-up batch."""
    dataset = build_pretrain_dataset(data_cfg)
    sampler = RandomSampler(dataset, replacement=True, num_samples=images + batch_size,
                            generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=0,
                        collate_fn=collate_skip_corrupt, drop_last=True)
    with single_threaded():
        batches = iter(loader)
        next(batches)  # warm-up: first-call allocations, lazy imports
        count = 0
        start = time.perf_counter()
        for batch, skipped in batches:
            count += batch[0].shape[0] + skipped
        seconds = time.perf_counter() - start
    if count == 0:
        raise ValueError(f"images={images} is below one batch of {batch_size}; time more images")
    return count / seconds
