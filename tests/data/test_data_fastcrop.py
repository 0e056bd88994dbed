"""The fast two-crop's exact shortcuts: what it skips leaves the views as the reference kernels make them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from albumentations.augmentations.pixel import functional as fpixel

from mocolab.data import fastcrop
from mocolab.data.augment import two_crop_transform

GREY_LEVELS = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # every grey pixel there is


@pytest.mark.parametrize(
    "adjust, factors",
    [
        (fpixel.adjust_saturation_torchvision, np.linspace(0.0, 2.0, 401)),
        (fpixel.adjust_hue_torchvision, np.linspace(-0.5, 0.5, 401)),
    ],
)
def test_saturation_and_hue_leave_every_grey_pixel_as_it_is(adjust, factors):
    # the premise of skipping them on a view ToGray made: per-pixel ops, so all 256 levels cover every grey image
    for factor in factors:
        assert np.array_equal(adjust(GREY_LEVELS.copy(), np.float64(factor)), GREY_LEVELS)


def _views(transform, image, seed):
    torch.manual_seed(seed)
    return [torch.stack(transform(image)) for _ in range(40)]


def test_skipping_them_on_grey_views_changes_no_pixel(monkeypatch):
    transform = two_crop_transform("moco_v1", 32)  # greys (p=0.2) before its jitter (hue 0.4)
    assert isinstance(transform, fastcrop.FastTwoCrop)
    image = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    skipped = _views(transform, image, seed=3)
    monkeypatch.setattr(fastcrop, "_IDENTITY_ON_GREY", ())
    computed = _views(transform, image, seed=3)
    greys = sum(bool((v[0] == v[1]).all() and (v[1] == v[2]).all()) for pair in skipped for v in pair)
    assert greys >= 4  # the skip ran (~16 of 80 views)
    assert all(torch.equal(a, b) for a, b in zip(skipped, computed))
