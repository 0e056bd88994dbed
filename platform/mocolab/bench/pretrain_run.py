"""A real ``mocolab pretrain`` run, timed: per-epoch throughput as the user gets it, and start-up.

The run is a subprocess (``python -m mocolab.cli pretrain``, so start-up is measured from a fresh command) of the
benchmarked config for a few epochs, without kNN monitor (``launcher.py`` times it apart) or evaluations, logging to
a throw-away MLflow store. Its epochs are read back from MLflow: ``epoch_time_s`` (the training loop) and the
timestamps of the per-epoch metrics, logged by rank 0 once per epoch, whose differences are the epochs' periods
(the loop plus everything the platform does between two epochs: checkpoint hand-off, ``ray.train.report``,
MLflow logging). Start-up is the time from the command's start to its first step: the first epoch's metric
timestamp minus that epoch's duration.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

RUN_EXPERIMENT = "mocolab-bench"
OUTPUT_TAIL_CHARS = 3000


@dataclass(frozen=True)
class EpochTimes:
    """The epochs of one timed run after its first (warm-up) one: images (all workers), seconds in the training
    loop, and period (seconds from the previous epoch's end-of-epoch point to this one's, the loop included)."""

    images: list[int]
    loop_s: list[float]
    period_s: list[float]

    def __post_init__(self) -> None:
        if not self.images or not len(self.images) == len(self.loop_s) == len(self.period_s):
            raise ValueError(
                "a timed run needs at least 2 epochs (the first is warm-up) and one value of each per epoch"
            )

    @property
    def img_s(self) -> float:
        """Images/s over whole epochs."""
        return sum(self.images) / sum(self.period_s)

    @property
    def loop_img_s(self) -> float:
        """Images/s of the training loop alone."""
        return sum(self.images) / sum(self.loop_s)

    @property
    def between_epochs_s(self) -> float:
        """Mean seconds per epoch outside the training loop."""
        return (sum(self.period_s) - sum(self.loop_s)) / len(self.period_s)


@dataclass(frozen=True)
class PretrainTimes:
    """What a timed ``mocolab pretrain`` run reports: its epochs and its start-up."""

    epochs: EpochTimes
    startup_s: float
    wall_s: float


def bench_run_config(cfg, epochs: int, workdir: Path) -> dict:
    """``cfg`` as a raw dict for a short timed run: ``epochs`` epochs, no kNN monitor, no evaluations, its own
    checkpoint cadence, a fresh run name, Ray results and MLflow store under ``workdir``."""
    raw = cfg.model_dump(mode="json")
    raw["train"].update(epochs=epochs, knn_every=0, max_failures=0)
    raw["eval"] = {"lincls": None, "detection": None}
    raw["scaling"]["storage_path"] = str(workdir / "ray_results")
    raw["tracking"] = {
        "experiment": RUN_EXPERIMENT,
        "run_name": f"bench-{time.strftime('%Y%m%d-%H%M%S')}-{time.perf_counter_ns() % 10**6}",
        "tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}",
    }
    return raw


def epoch_times(throughput: list[float], loop_s: list[float], logged_at_s: list[float]) -> EpochTimes:
    """:class:`EpochTimes` from a run's per-epoch ``throughput_img_s``, ``epoch_time_s`` and metric timestamps
    (seconds), first epoch dropped."""
    images = [round(rate * seconds) for rate, seconds in zip(throughput, loop_s)]
    periods = [b - a for a, b in zip(logged_at_s, logged_at_s[1:])]
    return EpochTimes(images[1:], loop_s[1:], periods)


def run_timed_pretrain(cfg, workdir: Path, epochs: int = 3, timeout_s: float = 3600) -> PretrainTimes:
    """Run ``mocolab pretrain`` on ``cfg`` (see :func:`bench_run_config`) in a subprocess and read its
    per-epoch metrics back from MLflow. Raises RuntimeError with the run's output tail if it fails."""
    from mocolab.tracking.names import EPOCH_TIME, THROUGHPUT
    from mocolab.tracking.runs import find_run
    from mocolab.tracking.store import client_for

    workdir.mkdir(parents=True, exist_ok=True)
    raw = bench_run_config(cfg, epochs, workdir)
    config_path = workdir / "bench_pretrain.yaml"
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "mocolab.cli", "pretrain", str(config_path)],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    wall = time.time() - started
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-OUTPUT_TAIL_CHARS:]
        raise RuntimeError(f"the timed pretraining run failed (exit {proc.returncode}); its output ends:\n{tail}")
    client = client_for(raw["tracking"]["tracking_uri"])
    run = find_run(client, RUN_EXPERIMENT, raw["tracking"]["run_name"])
    if run is None:
        raise RuntimeError(f"the timed pretraining run left no MLflow run named {raw['tracking']['run_name']}")
    times = sorted(client.get_metric_history(run.info.run_id, EPOCH_TIME), key=lambda m: m.step)
    rates = sorted(client.get_metric_history(run.info.run_id, THROUGHPUT), key=lambda m: m.step)
    if len(times) != epochs or len(rates) != epochs:
        raise RuntimeError(f"the timed run logged {len(times)} of {epochs} epochs of {EPOCH_TIME}")
    logged_at = [m.timestamp / 1000.0 for m in times]
    return PretrainTimes(
        epochs=epoch_times([m.value for m in rates], [m.value for m in times], logged_at),
        startup_s=logged_at[0] - times[0].value - started,
        wall_s=wall,
    )
