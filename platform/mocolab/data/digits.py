"""The made digits task: scikit-learn's bundled 8x8 digits on larger canvases (offline, no download).

Plain 8x8 digits are too easy to show what MoCo learns (raw-pixel kNN ~98 %). Here each digit is
scaled by a random factor in ``[min_scale, max_scale]`` and placed at a random position on a black
``canvas x canvas`` image, white on black. A random-init encoder then does poorly (its features depend on
where the digit is); MoCo's crops teach position and scale invariance, which the kNN monitor shows within
minutes on a CPU. The split is by digit image (stratified), so no test digit appears in training;
each training digit appears ``copies`` times at different placements.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

from mocolab.config import DIGIT_SIDE, DigitsConfig

NUM_CLASSES = 10
SPLITS = ("train", "test")


def place_digits(
    digits: np.ndarray, canvas: int, min_scale: float, max_scale: float, rng: np.random.Generator
) -> np.ndarray:
    """Put each 8x8 digit (values 0..16) white on a black canvas at a random scale and position.

    Returns uint8 RGB images ``[N, canvas, canvas, 3]``."""
    out = np.zeros((len(digits), canvas, canvas), dtype=np.uint8)
    sides = np.rint(DIGIT_SIDE * rng.uniform(min_scale, max_scale, size=len(digits))).astype(int)
    for i, (digit, side) in enumerate(zip(digits, sides)):
        glyph = cv2.resize((digit * (255.0 / 16.0)).astype(np.float32), (side, side), interpolation=cv2.INTER_LINEAR)
        y, x = rng.integers(0, canvas - side + 1, size=2)
        out[i, y : y + side, x : x + side] = np.clip(np.rint(glyph), 0, 255).astype(np.uint8)
    return np.repeat(out[..., None], 3, axis=3)


@functools.lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # imported here: config validation imports this module

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


@functools.lru_cache(maxsize=8)
def _make_task(
    canvas: int, min_scale: float, max_scale: float, copies: int, test_fraction: float, seed: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import train_test_split

    images, labels = _sklearn_digits()
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed
    )
    train_rng, test_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    train_idx = np.tile(np.sort(train_idx), copies)
    test_idx = np.sort(test_idx)
    task = {
        "train": (place_digits(images[train_idx], canvas, min_scale, max_scale, train_rng), labels[train_idx]),
        "test": (place_digits(images[test_idx], canvas, min_scale, max_scale, test_rng), labels[test_idx]),
    }
    for arrays in task.values():
        for array in arrays:
            array.setflags(write=False)  # shared by every caller through the cache
    return task


def digits_split(cfg: DigitsConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 RGB ``[N, canvas, canvas, 3]``, read-only) and int64 labels of one split.

    Deterministic given ``cfg``; built once per process and cached (a few MB)."""
    if split not in SPLITS:
        raise ValueError(f"digits split {split!r} does not exist; the digits task has splits {SPLITS}")
    task = _make_task(cfg.canvas, cfg.min_scale, cfg.max_scale, cfg.copies, cfg.test_fraction, cfg.seed)
    return task[split]
