"""What exact resume needs from the data pipeline: augmentations follow torch's RNG (which checkpoints
save and restore and DataLoader seeds per worker), not albumentations' own unseeded generators."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mocolab.data.augment import two_crop_transform

IMAGE = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def test_restoring_the_torch_rng_state_replays_the_augmentations():
    torch.manual_seed(3)
    first = [two_crop_transform("moco_v2", 24)(IMAGE) for _ in range(4)]
    torch.manual_seed(3)
    replay = two_crop_transform("moco_v2", 24)  # a fresh pipeline, as after a restart
    again = [replay(IMAGE) for _ in range(4)]
    for (q1, k1), (q2, k2) in zip(first, again):
        assert torch.equal(q1, q2) and torch.equal(k1, k2)
    assert not torch.equal(first[0][0], first[0][1])  # query and key are two different draws
    assert not torch.equal(first[0][0], first[1][0])


class _SameImage(Dataset):
    def __init__(self):
        self.transform = two_crop_transform("moco_v2", 24)

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        return self.transform(IMAGE)[0]


def test_dataloader_workers_draw_different_augmentations():
    torch.manual_seed(0)
    loader = DataLoader(_SameImage(), batch_size=1, num_workers=2)  # item i comes from worker i
    view_worker0, view_worker1 = list(loader)
    assert not torch.equal(view_worker0, view_worker1)
