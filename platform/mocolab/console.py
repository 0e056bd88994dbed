"""mocolab's console: how much of Ray's and MLflow's output it shows, one-line messages, and progress bars.

By default Ray (driver), Ray Train (controller, workers) and MLflow show only errors on the console; ``--verbose``
(``MOCOLAB_VERBOSE=1``) brings back their informational output, which Ray's log files keep either way. The
settings are Ray's and MLflow's own (:func:`mocolab.runtime.ensure_ray`, ``MLFLOW_LOGGING_LEVEL``).

A worker loop's progress bar is Ray's distributed tqdm (``ray.experimental.tqdm_ray``): the worker prints the bar's
state as one JSON line, Ray streams it to the driver with the rest of the worker's output, and the driver draws a
real tqdm bar (step count, rate, ETA), so a bar works the same on a local Ray and on a cluster. The worker sends at
most one update per :data:`REFRESH_S`, plus the final state.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Optional

VERBOSE_ENV = "MOCOLAB_VERBOSE"
"""``1``: Ray's and MLflow's informational console output is shown (``--verbose``); otherwise only their errors."""


def set_verbose(verbose: bool) -> None:
    """Choose the console of this command and of the Ray jobs it starts (see :func:`mocolab.runtime.ray_job_env`);
    call it before MLflow is imported (MLflow reads ``MLFLOW_LOGGING_LEVEL`` then; a value set by the user wins)."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    level = os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    logging.getLogger("mlflow").setLevel(level)  # in case MLflow is imported already


def is_verbose() -> bool:
    """Whether this process shows Ray's and MLflow's informational output (``MOCOLAB_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV) == "1"


REFRESH_S = 0.5
"""Least time between two bar updates sent to the driver."""


def console(line: str) -> None:
    """Print one line to the process's real stdout (in a Ray worker, what Ray streams to the driver), once."""
    print(line, file=sys.__stdout__, flush=True)


def describe(label: str, loss: Optional[float], lr: Optional[float], images_per_s: float) -> str:
    """A bar's text: ``epoch 3/200  loss 6.1234  lr 0.03  812 img/s`` (no loss and lr before the first step)."""
    parts = [label] + ([f"loss {loss:.4f}", f"lr {lr:.4g}"] if loss is not None else [])
    return "  ".join(parts + [f"{images_per_s:,.0f} img/s"])


class StepProgress:
    """A progress bar over ``total`` steps of a loop, labelled ``label`` plus the loss, lr and images/s so far.

    Inactive (``active=False``, e.g. on ranks other than 0) it does nothing. Use it as a context manager, or call
    :meth:`close`; ``label`` may change between steps (``"epoch 3/200"``)."""

    def __init__(self, label: str, total: int, active: bool = True):
        self.label = label
        self._bar = None
        if active:
            from ray.experimental.tqdm_ray import tqdm

            self._bar = tqdm(desc=label, total=total, unit="step", flush_interval_s=0)
        self._steps = self._images = 0
        self._loss: Optional[float] = None
        self._lr: Optional[float] = None
        self._started = time.perf_counter()
        self._sent = float("-inf")

    def __enter__(self) -> "StepProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def step(self, images: int, loss, lr: float) -> None:
        """One step over ``images`` images (all workers) with this ``loss`` (a number or a 0-d tensor, read only
        when an update is sent) and learning rate."""
        if self._bar is None:
            return
        self._steps += 1
        self._images += images
        now = time.perf_counter()
        if now - self._sent >= REFRESH_S:
            self._loss, self._lr = float(loss), lr
            self._send(now)

    def _send(self, now: float) -> None:
        self._sent = now
        self._bar.n = self._steps
        self._bar.set_description(describe(self.label, self._loss, self._lr, self._images / max(now - self._started, 1e-9)))

    def close(self) -> None:
        """Send the final state and close the bar (idempotent)."""
        if self._bar is None:
            return
        self._send(time.perf_counter())
        self._bar.close()
        self._bar = None
