"""Expected wall time of a reproduction: a per-trial estimate calibrated on the project's 2-core CPU machine
(one Ray Train worker holding one core per trial), and the schedule of a sweep's trials over its slots.

Calibration (small_cnn on the made digits task at 16 px, one thread, CPU seconds, so that load from other
processes does not inflate it): ``platform/research/momentum_probe.py`` and ``mocolab sweep`` runs; see the
constants. Other architectures are not calibrated: their trials are estimated as small_cnn's, scaled by pixels.
Detection runs (``eval.detection``): small_cnn's single-level Faster R-CNN timed for one fine-tuning step of 4
images at 64x64 and 96x128 px (CPU seconds, one thread), a fixed part per image and a part per pixel.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from mocolab.moco.mechanisms import mechanism_class

TRAIN_SECONDS_PER_IMAGE = 2.2e-3
"""One training image (both crops: query forward + backward, key forward) at 16 px, moco, small_cnn."""
KNN_SECONDS_PER_IMAGE = 0.35e-3
"""One image of the kNN monitor (train bank + test queries, one forward each) at 16 px."""
TRIAL_OVERHEAD_SECONDS = 25.0
"""Per trial: Ray Train worker group start, MLflow run, checkpoints, final backbone."""
REFERENCE_SIDE = 16
DETECTION_SECONDS_PER_IMAGE = 0.042
"""One fine-tuning image of ``eval.detection`` (small_cnn, one level, 64 RoIs), the part that does not grow with its
pixels (the RPN's and box head's losses); CPU seconds, one thread: 0.063 s at 64x64 px, 0.105 s at 96x128."""
DETECTION_SECONDS_PER_PIXEL = 5.1e-6
"""The part of a fine-tuning image that grows with its pixels (the backbone's forward and backward)."""
DETECTION_OVERHEAD_SECONDS = 30.0
"""Per detection run: Ray Train worker start, data, the val split's predictions and COCO AP, MLflow run."""


def trial_seconds(cfg, train_images: int, test_images: int) -> float:
    """Expected wall time of one trial of ``cfg`` (a Config) on ``train_images`` / ``test_images`` images; the
    mechanism's ``cost_factor`` scales the training time."""
    pixels = (cfg.data.image_size / REFERENCE_SIDE) ** 2
    cost = mechanism_class(cfg.moco.mechanism).cost_factor
    per_epoch = train_images * TRAIN_SECONDS_PER_IMAGE * cost * pixels
    if cfg.moco.symmetric:
        per_epoch *= 2
    knn_epochs = 0
    if cfg.train.knn_every:
        knn_epochs = cfg.train.epochs // cfg.train.knn_every + (cfg.train.epochs % cfg.train.knn_every != 0)
    knn = knn_epochs * (train_images + test_images) * KNN_SECONDS_PER_IMAGE * pixels
    cores = max(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker, 1.0)
    return TRIAL_OVERHEAD_SECONDS + (cfg.train.epochs * per_epoch) / cores + knn


def detection_seconds(cfg) -> float:
    """Expected wall time of the ``eval.detection`` run of ``cfg`` (a Config; 0 without one): its images per
    worker at ``min_size x max_size`` pixels, timed as small_cnn's (other architectures are not calibrated), plus
    the overhead."""
    det = cfg.eval.detection
    if det is None:
        return 0.0
    per_image = DETECTION_SECONDS_PER_IMAGE + DETECTION_SECONDS_PER_PIXEL * det.min_size * det.max_size
    return DETECTION_OVERHEAD_SECONDS + det.iterations * det.batch_size * per_image


def schedule_seconds(durations: Iterable[float], slots: int) -> float:
    """Wall time of trials started in order, each on the first free of ``slots`` (as Tune starts a grid)."""
    if slots < 1:
        raise ValueError(f"slots={slots} must be >= 1")
    free_at = [0.0] * slots
    for duration in durations:
        start = heapq.heappop(free_at)
        heapq.heappush(free_at, start + duration)
    return max(free_at)


def minutes(seconds: float) -> str:
    """``12.5 min``."""
    return f"{seconds / 60:.1f} min"
