"""The fast two-crop (mocolab.data.fastcrop) against the albumentations reference, recipe by recipe.

Statistical rule: every check is a two-sample test at alpha = 0.001 (about 1 % family-wise over the ~10 checks of
a recipe): Kolmogorov-Smirnov for continuous figures (crop area fraction, log aspect ratio; per view: channel means,
pixel std, sharpness), a two-proportion z-test for rates (grayscale, flip). Jitter factors are drawn by both from the
same op parameters and are checked through what they move: the channel means and the pixel std. Each check must
also reject a recipe with one parameter changed (crop scale (0.3, 1), grayscale p 0.3).
"""

from __future__ import annotations

import io
import math
import random

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from sklearn.datasets import load_sample_images

from mocolab.data.augment import TwoCropTransform, _ops
from mocolab.data.fastcrop import FastTwoCrop
from mocolab.data.images import decode_rgb

ALPHA = 1e-3
SIZE = 64  # small views keep the test fast
VIEWS = 600  # two-crop calls per pipeline
CROPS = 3000


@pytest.fixture(scope="module")
def photo() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(load_sample_images().images[0]).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _ramp() -> np.ndarray:
    """Grey, brighter to the right: jitter keeps it grey and its left-right order (positive factors)."""
    ramp = np.tile(np.linspace(20, 235, 160), (120, 1)).astype(np.uint8)
    return np.repeat(ramp[..., None], 3, axis=2)


def _reference_views(recipe, data, n, seed=0):
    torch.manual_seed(seed)
    transform = TwoCropTransform(recipe, SIZE)
    image = data if isinstance(data, np.ndarray) else decode_rgb(data, "photo")
    return [_unnormalize(v) for _ in range(n) for v in transform(image)]


def _fast_views(transform, data, n, seed=0):
    torch.manual_seed(seed)
    call = transform if isinstance(data, np.ndarray) else transform.from_encoded
    return [v.permute(1, 2, 0).numpy() for _ in range(n) for v in call(data)]


def _unnormalize(view: torch.Tensor) -> np.ndarray:
    mean = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
    return ((view * std + mean) * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def _features(views) -> dict[str, np.ndarray]:
    v = np.stack(views).astype(np.float32)
    grey = [cv2.cvtColor(x, cv2.COLOR_RGB2GRAY) for x in views]
    return {
        "mean_r": v[..., 0].mean((1, 2)),
        "mean_g": v[..., 1].mean((1, 2)),
        "mean_b": v[..., 2].mean((1, 2)),
        "std": v.std((1, 2, 3)),
        "sharpness": np.array([cv2.Laplacian(g, cv2.CV_32F).var() for g in grey]),
        "grey": np.array([np.abs(x[..., 0].astype(int) - x[..., 2]).max() <= 1 for x in views]),
    }


def _flips(views) -> np.ndarray:
    return np.array([x[:, : SIZE // 4].mean() > x[:, -SIZE // 4 :].mean() for x in views])


def _proportion_p(a: np.ndarray, b: np.ndarray) -> float:
    pooled = (a.sum() + b.sum()) / (len(a) + len(b))
    se = math.sqrt(pooled * (1 - pooled) * (1 / len(a) + 1 / len(b))) or 1.0
    return 2 * stats.norm.sf(abs(a.mean() - b.mean()) / se)


def _crop_stats(boxes, height, width):
    area = np.array([(b[2] - b[0]) * (b[3] - b[1]) / (height * width) for b in boxes])
    log_ratio = np.log([(b[2] - b[0]) / (b[3] - b[1]) for b in boxes])
    return {"area": area, "log_ratio": log_ratio}


def _reference_crops(recipe, height, width):
    crop = _ops(recipe, SIZE)[0]
    crop.set_random_state(np.random.default_rng(1), random.Random(1))
    return [crop.get_params_dependent_on_data({"shape": (height, width)}, {})["crop_coords"] for _ in range(CROPS)]


def _fast_crops(transform, height, width):
    torch.manual_seed(1)
    boxes = [b for _ in range(CROPS // 2) for b in transform._crop_boxes(height, width, transform._uniforms())]
    return [(b.x0, b.y0, b.x1, b.y1) for b in boxes]


def failed_checks(recipe: str, fast: FastTwoCrop, photo: bytes) -> list[str]:
    """The names of the checks in which ``fast`` differs from the reference of ``recipe`` at ALPHA."""
    failed = []
    ref_crops = _crop_stats(_reference_crops(recipe, 427, 640), 427, 640)
    fast_crops = _crop_stats(_fast_crops(fast, 427, 640), 427, 640)
    failed += [k for k in ref_crops if stats.ks_2samp(ref_crops[k], fast_crops[k]).pvalue < ALPHA]
    ref, new = _features(_reference_views(recipe, photo, VIEWS)), _features(_fast_views(fast, photo, VIEWS))
    for key in ref:
        p = _proportion_p(ref[key], new[key]) if key == "grey" else stats.ks_2samp(ref[key], new[key]).pvalue
        if p < ALPHA:
            failed.append(key)
    ramp = _ramp()
    flips = _flips(_reference_views(recipe, ramp, VIEWS // 2)), _flips(_fast_views(fast, ramp, VIEWS // 2))
    if _proportion_p(*flips) < ALPHA:
        failed.append("flip")
    return failed


def _fast(recipe: str, change=None) -> FastTwoCrop:
    ops = _ops(recipe, SIZE)
    if change:
        change(ops)
    return FastTwoCrop(ops, SIZE)


@pytest.mark.parametrize("recipe", ["moco_v1", "moco_v2"])
def test_the_fast_path_has_the_reference_distribution(recipe, photo):
    assert failed_checks(recipe, _fast(recipe), photo) == []


def _scale(ops):
    ops[0].scale = (0.3, 1.0)


def _grey(ops):
    next(op for op in ops if type(op).__name__ == "ToGray").p = 0.3


@pytest.mark.parametrize("change, check", [(_scale, "area"), (_grey, "grey")])
def test_the_checks_reject_a_changed_recipe(change, check, photo):
    assert check in failed_checks("moco_v2", _fast("moco_v2", change), photo)
