"""Images/s per CPU core of each input pipeline x MoCo recipe, on real JPEGs: what sizing a GPU node needs.

:data:`PIPELINES` is a registry ``name -> factory(recipe, image_size)``; a factory returns a function from a batch of
files' bytes to the batch the training step receives. The first row is today's reference (PIL decode,
albumentations Compose, float normalise), the baseline; ``fast_cpu`` is the default CPU path; the device pipeline
(``data.pipeline=device``) gives two rows: ``device_host`` (the CPU's share when a GPU decodes and augments: bytes to
tensors and the batch) and ``device_on_cpu`` (kornia's whole two-crop on one CPU thread: the same code without a
GPU). Each round runs every row over the same images in batches of :data:`BATCH` on one thread (a loader worker's
share: one core), rows in alternating order (``device_on_cpu`` in rounds of its own after them,
:data:`TIMED_APART`); the table gives median/min/max over rounds and the cores per GPU a step rate needs.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mocolab.bench.spread import Spread
from mocolab.data.datasets import collate_views

RECIPES = ("moco_v1", "moco_v2")
BATCH = 64
DEFAULT_STEP_RATE = 3500.0  # img/s of a ResNet-50 MoCo step, bf16, one H100 (issue 22)
Batch = Callable[[list[bytes]], Any]


def _collated(views: Callable[[bytes], Any]) -> Batch:
    """Per-image views, collated as the loader does (with the index)."""
    return lambda blobs: collate_views([(*views(data), i) for i, data in enumerate(blobs)])


def _reference(recipe: str, image_size: int) -> Batch:
    from mocolab.data.augment import TwoCropTransform
    from mocolab.data.images import decode_rgb

    transform = TwoCropTransform(recipe, image_size)
    return _collated(lambda data: transform(decode_rgb(data, "bench image")))


def _fast_cpu(recipe: str, image_size: int) -> Batch:
    from mocolab.data.augment import two_crop_transform
    from mocolab.data.images import decode_rgb

    transform = two_crop_transform(recipe, image_size)  # the fast path for the named recipes

    def views(data: bytes):
        out = transform.from_encoded(data)
        return out if out is not None else transform(decode_rgb(data, "bench image"))

    return _collated(views)


def _device_host(recipe: str, image_size: int) -> Batch:
    import torch

    from mocolab.data.encoded import collate_encoded

    return lambda blobs: collate_encoded(
        [(torch.frombuffer(bytearray(data), dtype=torch.uint8), f"#{i}", i) for i, data in enumerate(blobs)]
    )


def _device_on_cpu(recipe: str, image_size: int) -> Batch:
    from mocolab.data.encoded import two_crop_bytes

    return lambda blobs: two_crop_bytes(blobs, recipe, image_size, "cpu")


PIPELINES: dict[str, Callable[[str, int], Batch]] = {
    "albumentations": _reference,
    "fast_cpu": _fast_cpu,
    "device_host": _device_host,
    "device_on_cpu": _device_on_cpu,
}
BASELINE = "albumentations"
TIMED_APART = ("device_on_cpu",)
"""Rows timed after the others' rounds, not among them: kornia's float batches on the CPU churn the allocator and
the kernel's page handling (minutes of system time), which slowed the row after them by up to ~20 %."""


def sample_jpegs() -> list[bytes]:
    """scikit-learn's two sample photos (640x427), JPEG-encoded at quality 90 in memory."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    blobs = []
    for array in load_sample_images().images:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=90)
        blobs.append(buffer.getvalue())
    return blobs


def folder_jpegs(folder: Path) -> list[bytes]:
    """The bytes of every image file under ``folder``; ValueError naming ``--images`` when there is none."""
    from mocolab.data.sources import folder_images

    paths = folder_images(folder)
    if not paths:
        raise ValueError(f"--images {folder}: no image files there; give a folder of JPEGs")
    return [Path(p).read_bytes() for p in paths]


def _round(batch: Batch, blobs: list[bytes], images: int) -> float:
    start = time.perf_counter()
    for first in range(0, images, BATCH):
        batch([blobs[i % len(blobs)] for i in range(first, min(images, first + BATCH))])
    return images / (time.perf_counter() - start)


def _timed_rounds(runs: dict[str, Batch], blobs: list[bytes], images: int, rounds: int) -> dict[str, list[float]]:
    """img/s of every row in each of ``rounds`` rounds; a round runs the rows back to back, in alternating order,
    each after an untimed batch of its own (the row before leaves the allocator in its state, not this row's)."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        for name in list(runs) if r % 2 == 0 else reversed(list(runs)):
            _round(runs[name], blobs, min(images, BATCH))
            rates[name].append(_round(runs[name], blobs, images))
    return rates


def pipeline_rows(
    blobs: list[bytes], image_size: int, images: int, rounds: int, step_rate: float = DEFAULT_STEP_RATE
) -> list[dict[str, Any]]:
    """One row per pipeline x recipe: ``pipeline, augment, image_size, img_per_s_per_core`` (median/min/max over
    ``rounds`` of ``images`` images), ``speedup`` over the baseline (median/min/max of the per-round ratios) and
    ``cores_per_gpu`` for ``step_rate``. The :data:`TIMED_APART` rows run after all the others' rounds."""
    from mocolab.bench.data import single_threaded

    rates: dict[tuple[str, str], list[float]] = {}
    with single_threaded():
        for apart in (False, True):
            for recipe in RECIPES:
                runs = {n: f(recipe, image_size) for n, f in PIPELINES.items() if (n in TIMED_APART) == apart}
                for name, rate in _timed_rounds(runs, blobs, images, rounds).items():
                    rates[name, recipe] = rate
    rows = []
    for recipe in RECIPES:
        for name in PIPELINES:
            spread = Spread.of(rates[name, recipe])
            # per-round ratios: in a round the rows ran back to back, so the machine's drift cancels in the pair
            ratio = Spread.of([rate / base for rate, base in zip(rates[name, recipe], rates[BASELINE, recipe])])
            rows.append(
                {
                    "pipeline": name,
                    "augment": recipe,
                    "image_size": image_size,
                    "img_per_s_per_core": {"median": spread.median, "min": spread.min, "max": spread.max},
                    "speedup": {"median": ratio.median, "min": ratio.min, "max": ratio.max},
                    "cores_per_gpu": math.ceil(step_rate / spread.median),
                }
            )
    return rows


def pipeline_table(rows: list[dict[str, Any]], step_rate: float, images: str) -> str:
    """The rows as text, with the step rate they are sized for and where the images came from."""
    header = (
        f"{'pipeline':<16}{'augment':<10}{'size':>5}{'median':>11}{'min':>11}{'max':>11}"
        f"{'x base [min, max]':>26}{'cores/GPU':>11}"
    )
    lines = [
        f"input pipelines, img/s per core ({images}; x base: per-round ratios; cores per GPU for a "
        f"{step_rate:.0f} img/s step)",
        header,
    ]
    for row in rows:
        rate, ratio = row["img_per_s_per_core"], row["speedup"]
        span = f"{ratio['median']:.2f} [{ratio['min']:.2f}, {ratio['max']:.2f}]"
        lines.append(
            f"{row['pipeline']:<16}{row['augment']:<10}{row['image_size']:>5}{rate['median']:>11.1f}"
            f"{rate['min']:>11.1f}{rate['max']:>11.1f}{span:>26}{row['cores_per_gpu']:>11}"
        )
    return "\n".join(lines)


def image_bytes(folder: Path | None) -> tuple[list[bytes], str]:
    """The bench's images and a label: the files of ``folder``, or scikit-learn's sample photos."""
    if folder is None:
        return sample_jpegs(), "scikit-learn sample photos, 640x427 JPEG q90"
    return folder_jpegs(folder), str(folder)
