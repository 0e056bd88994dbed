"""Images/s per CPU core of each input pipeline x MoCo recipe, on real JPEGs: what sizing a GPU node needs.

:data:`PIPELINES` is a registry ``name -> factory(recipe, image_size)``; a factory returns a function from a batch of
files' bytes to the batch the training step receives. The first row is today's reference (PIL decode,
albumentations Compose, float normalise), the baseline; ``fast_cpu`` is the default CPU path; the device pipeline
(``data.pipeline=device``) gives two rows: ``device_host`` (the CPU's share when a GPU decodes and augments: bytes to
tensors and the batch) and ``device_on_cpu`` (kornia's whole two-crop on one CPU thread: the same code without a
GPU). Each pipeline runs in a process of its own on one thread, as a loader worker does (its own allocator and
caches: one core's share); a round takes the same images through every pipeline in batches of :data:`BATCH`, the
pipelines taking turns batch by batch (``device_on_cpu`` in rounds of its own after them, :data:`TIMED_APART`); the
table gives median/min/max over rounds and the cores per GPU a step rate needs.
"""

from __future__ import annotations

import io
import math
import multiprocessing as mp
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
"""Rows timed after the others' rounds, not among them: kornia's float batches on the CPU churn the kernel's page
handling (minutes of system time), which slowed the row after them by up to ~20 % when the rows shared a process."""


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


def _serve_pipeline(conn, name: str, image_size: int, blobs: list[bytes]) -> None:
    """A pipeline's process (as a loader worker runs it: its own allocator, caches and one thread): answers
    ``(recipe, first, count)`` with the seconds batch ``blobs[first : first + count]`` (cyclically) took, until None."""
    from mocolab.bench.data import single_threaded

    batches: dict[str, Batch] = {}
    with single_threaded():
        while (request := conn.recv()) is not None:
            recipe, first, count = request
            try:
                if recipe not in batches:
                    batches[recipe] = PIPELINES[name](recipe, image_size)
                images = [blobs[i % len(blobs)] for i in range(first, first + count)]
                start = time.perf_counter()
                batches[recipe](images)
                conn.send(time.perf_counter() - start)
            except Exception as err:  # noqa: BLE001 - handed to the parent, which raises it
                conn.send(err)


class _PipelineProcess:
    """The parent's end of :func:`_serve_pipeline`: one pipeline in a process of its own."""

    def __init__(self, name: str, image_size: int, blobs: list[bytes]):
        context = mp.get_context("forkserver")  # a clean server imports the pipelines once; each is forked from it
        context.set_forkserver_preload([__name__, "mocolab.data.augment", "mocolab.data.encoded"])
        self.name, (self.conn, child) = name, context.Pipe()
        self.process = context.Process(target=_serve_pipeline, args=(child, name, image_size, blobs), daemon=True)
        self.process.start()
        child.close()

    def seconds(self, recipe: str, first: int, count: int) -> float:
        """Seconds one batch took in the process; its error, raised here, when it failed."""
        self.conn.send((recipe, first, count))
        try:
            answer = self.conn.recv()
        except EOFError:
            self.process.join(timeout=5)
            raise RuntimeError(
                f"input pipeline {self.name}'s process ended (exit code {self.process.exitcode})"
            ) from None
        if isinstance(answer, Exception):
            raise RuntimeError(f"input pipeline {self.name} ({recipe}) failed: {answer}") from answer
        return answer

    def close(self) -> None:
        try:
            self.conn.send(None)
        except OSError:  # the process has gone already
            pass
        self.process.join(timeout=30)


def _timed_rounds(
    processes: dict[str, _PipelineProcess], recipe: str, images: int, rounds: int
) -> dict[str, list[float]]:
    """img/s of every pipeline in each of ``rounds`` rounds of ``images`` images: batch by batch the pipelines take
    turns (in alternating order), so a pair of rates in a round was measured within a batch's time of each other and
    the machine's drift cancels in their ratio. One untimed batch each first."""
    for process in processes.values():
        process.seconds(recipe, 0, min(images, BATCH))
    rates: dict[str, list[float]] = {name: [] for name in processes}
    for r in range(rounds):
        seconds = dict.fromkeys(processes, 0.0)
        for b, first in enumerate(range(0, images, BATCH)):
            count = min(images, first + BATCH) - first
            for name in list(processes) if (r + b) % 2 == 0 else reversed(list(processes)):
                seconds[name] += processes[name].seconds(recipe, first, count)
        for name in processes:
            rates[name].append(images / seconds[name])
    return rates


def pipeline_rows(
    blobs: list[bytes], image_size: int, images: int, rounds: int, step_rate: float = DEFAULT_STEP_RATE
) -> list[dict[str, Any]]:
    """One row per pipeline x recipe: ``pipeline, augment, image_size, img_per_s_per_core`` (median/min/max over
    ``rounds`` of ``images`` images), ``speedup`` over the baseline (median/min/max of the per-round ratios) and
    ``cores_per_gpu`` for ``step_rate``. The :data:`TIMED_APART` rows run after all the others' rounds."""
    rates: dict[tuple[str, str], list[float]] = {}
    processes = {name: _PipelineProcess(name, image_size, blobs) for name in PIPELINES}
    try:
        for apart in (False, True):
            for recipe in RECIPES:
                group = {n: p for n, p in processes.items() if (n in TIMED_APART) == apart}
                for name, rate in _timed_rounds(group, recipe, images, rounds).items():
                    rates[name, recipe] = rate
    finally:
        for process in processes.values():
            process.close()
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
