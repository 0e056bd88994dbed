"""``data.pipeline=device`` (kornia on tensors, run here on the CPU) holds the recipes of ``data/augment.py``
(albumentations) to the same distribution, and a changed parameter is caught.

Statistical rule: every comparison is a test at ALPHA = 1e-3 (two-sample Kolmogorov-Smirnov for crop area and
aspect ratio, one-sample KS against albumentations' uniform range for the jitter factors and blur sigma, an exact
binomial test of each op's application rate against albumentations' ``p``); the pixel statistics (per-view channel
means and standard deviations on a real photo) must be within a KS distance of PIXEL_TOLERANCE of
albumentations' (the two implementations interpolate and convert HSV slightly differently, so not identical)."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from mocolab.data.augment import _ops, two_crop_transform
from mocolab.data.device_augment import RECIPES, DeviceTwoCrop, sample_crop_boxes
from mocolab.data.encoded import two_crop_bytes
from mocolab.data.images import decode_rgb
from mocolab.data.normalize import normalize_views

ALPHA = 1e-3
PIXEL_TOLERANCE = 0.15
N = 3000
SIZE = 64
_KORNIA = {
    "ColorJitter": "ColorJitter",
    "RandomGrayscale": "ToGray",
    "RandomGaussianBlur": "GaussianBlur",
    "RandomHorizontalFlip": "HorizontalFlip",
}


def _photo() -> bytes:
    import sklearn.datasets

    return (Path(sklearn.datasets.__file__).parent / "images" / "flower.jpg").read_bytes()


def _albu(name: str) -> dict:
    return {type(op).__name__: op for op in _ops(name, SIZE)}


def _crop_stats(boxes: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(area fraction, log aspect ratio) of boxes (top, left, height, width)."""
    return boxes[:, 2] * boxes[:, 3] / (h * w), np.log(boxes[:, 3] / boxes[:, 2])


@functools.lru_cache(maxsize=8)
def _albu_boxes(name: str, h: int, w: int, n: int) -> np.ndarray:
    """``n`` RandomResizedCrop boxes (top, left, height, width) of albumentations' recipe ``name``."""
    op = _albu(name)["RandomResizedCrop"]
    op.set_random_seed(0)
    out = []
    for _ in range(n):
        x0, y0, x1, y1 = op.get_params_dependent_on_data({"shape": (h, w, 3)}, {})["crop_coords"]
        out.append((y0, x0, y1 - y0, x1 - x0))
    return np.array(out, dtype=np.float64)


def _kornia_params(transform: DeviceTwoCrop, n: int) -> dict[str, dict]:
    """Each kornia op's parameters over a batch of ``n`` small images: {op name: _params}."""
    torch.manual_seed(0)
    batch = torch.rand(n, 3, 16, 16)
    for op in transform.ops:
        batch = op(batch)
    return {type(op).__name__: op._params for op in transform.ops}


def mismatches(name: str, recipe) -> list[str]:
    """The checks the device ``recipe`` fails against albumentations' ``name`` (parameters only, no pixels)."""
    albu, failed = _albu(name), []
    torch.manual_seed(0)
    for h, w in ((300, 400), (400, 150)):  # the second is outside the aspect range: fallbacks happen
        device = sample_crop_boxes(torch.full((N,), h), torch.full((N,), w), recipe.scale, recipe.ratio).numpy()
        for label, a, b in zip(
            ("crop area", "crop aspect"), _crop_stats(device, h, w), _crop_stats(_albu_boxes(name, h, w, N), h, w)
        ):
            if stats.ks_2samp(a, b).pvalue < ALPHA:
                failed.append(f"{label} {h}x{w}")
    transform = DeviceTwoCrop(recipe, SIZE)
    names = [_KORNIA[type(op).__name__] for op in transform.ops]
    albu_order = [n for n in albu if n in _KORNIA.values()]
    if names != albu_order:
        failed.append(f"order {names} != {albu_order}")
    params = _kornia_params(transform, N)
    for kornia_name, albu_name in _KORNIA.items():
        applied = params.get(kornia_name, {}).get("batch_prob")
        count = int(applied.sum()) if applied is not None else 0
        if stats.binomtest(count, N, albu[albu_name].p if albu_name in albu else 0.0).pvalue < ALPHA:
            failed.append(f"{albu_name} rate {count / N:.3f}")
    jitter = albu.get("ColorJitter")
    if jitter is not None and "ColorJitter" in params:
        p = params["ColorJitter"]
        for key in ("brightness", "contrast", "saturation", "hue"):
            lo, hi = getattr(jitter, key)
            sample = p[f"{key}_factor"].numpy()
            if stats.kstest(sample, stats.uniform(lo, hi - lo).cdf).pvalue < ALPHA:
                failed.append(f"jitter {key}")
    blur = albu.get("GaussianBlur")
    if blur is not None:
        p = params["RandomGaussianBlur"]
        lo, hi = blur.sigma_limit
        if stats.kstest(p["sigma"].numpy().ravel(), stats.uniform(lo, hi - lo).cdf).pvalue < ALPHA:
            failed.append("blur sigma")
        if tuple(transform.ops[names.index("GaussianBlur")].flags["kernel_size"]) != tuple(blur.blur_limit):
            failed.append("blur kernel")
    return failed


def pixel_distance(name: str, recipe, n: int = 400) -> float:
    """The largest KS distance between the device and albumentations views' per-channel means and stds."""
    photo = _photo()
    torch.manual_seed(0)
    albu = two_crop_transform(name, SIZE)
    image = decode_rgb(photo, "flower.jpg")
    cpu = normalize_views(
        torch.stack([albu(image)[0] for _ in range(n)])
    )  # the CPU path's uint8 views, as the step sees them
    device = DeviceTwoCrop(recipe, SIZE).view([torch.from_numpy(image.copy()).permute(2, 0, 1).contiguous()] * n)
    worst = 0.0
    for reduce in (lambda t: t.mean(dim=(2, 3)), lambda t: t.std(dim=(2, 3))):
        a, b = reduce(cpu).numpy(), reduce(device).numpy()
        worst = max(worst, *(stats.ks_2samp(a[:, c], b[:, c]).statistic for c in range(3)))
    return worst


@pytest.mark.parametrize("name", ["moco_v1", "moco_v2"])
def test_device_recipe_matches_albumentations(name):
    assert mismatches(name, RECIPES[name]) == []


@pytest.mark.parametrize("name", ["moco_v1", "moco_v2"])
def test_device_views_have_the_pixel_statistics_of_albumentations(name):
    assert pixel_distance(name, RECIPES[name]) <= PIXEL_TOLERANCE


@pytest.mark.parametrize(
    "change, caught",
    [
        ({"scale": (0.3, 1.0)}, "crop area 300x400"),
        ({"ratio": (0.5, 2.0)}, "crop aspect 300x400"),
        ({"gray_p": 0.25}, "ToGray rate"),
        ({"flip_p": 0.45}, "HorizontalFlip rate"),
        ({"blur_p": 0.45}, "GaussianBlur rate"),
        ({"jitter_p": 0.75}, "ColorJitter rate"),
        ({"jitter": (0.4, 0.4, 0.4, 0.15)}, "jitter hue"),
        ({"jitter": (0.5, 0.4, 0.4, 0.1)}, "jitter brightness"),
        ({"blur_sigma": (0.1, 2.5)}, "blur sigma"),
        ({"gray_first": True}, "order"),
    ],
)
def test_a_changed_parameter_fails_the_distribution_checks(change, caught):
    failed = mismatches("moco_v2", dataclasses.replace(RECIPES["moco_v2"], **change))
    assert any(f.startswith(caught) for f in failed), failed


def test_a_changed_jitter_strength_fails_the_pixel_statistics():
    stronger = dataclasses.replace(RECIPES["moco_v2"], jitter=(0.9, 0.9, 0.4, 0.1))
    assert pixel_distance("moco_v2", stronger) > PIXEL_TOLERANCE


def test_device_views_are_deterministic_under_a_seed():
    files = [_photo()] * 4

    def views(seed: int):
        torch.manual_seed(seed)
        return two_crop_bytes(files, "moco_v2", 32)

    q1, k1 = views(3)
    q2, k2 = views(3)
    q3, _ = views(4)
    assert q1.shape == (4, 3, 32, 32) and torch.equal(q1, q2) and torch.equal(k1, k2)
    assert not torch.equal(q1, k1) and not torch.equal(q1, q3)


def test_crop_boxes_fit_their_images():
    torch.manual_seed(0)
    heights, widths = torch.randint(1, 500, (2000,)), torch.randint(1, 500, (2000,))
    top, left, h, w = sample_crop_boxes(heights, widths, (0.2, 1.0), (3 / 4, 4 / 3)).T
    assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= heights).all() and (left + w <= widths).all()
