"""mocolab's console: how much of Ray's and MLflow's output it shows, one-line messages, and progress bars.

By default Ray (driver), Ray Train (controller, workers) and MLflow show only errors on the console; ``--verbose``
(``MOCOLAB_VERBOSE=1``) brings back their informational output, which Ray's log files keep either way. The
settings are Ray's and MLflow's own (:func:`mocolab.runtime.ensure_ray`, ``MLFLOW_LOGGING_LEVEL``).

A worker loop's progress depends on where the command's console goes (:func:`progress_mode`, decided by the driver
and handed to the workers in ``MOCOLAB_PROGRESS``):

- ``bar`` (a terminal): Ray's distributed tqdm (``ray.experimental.tqdm_ray``): the worker prints the bar's state as
  one JSON line, Ray streams it to the driver with the rest of the worker's output, and the driver redraws a real
  tqdm bar (step count, rate, ETA) in place; the worker sends at most one update per :data:`REFRESH_S`;
- ``lines`` (a file, a pipe, ``ray job submit``'s log stream, which turns each redraw into a line of its own): one
  plain line every :data:`LINE_EVERY_S` with the same numbers.
"""

from __future__ import annotations

import logging
import os
import sys
import time

VERBOSE_ENV = "MOCOLAB_VERBOSE"
"""``1``: Ray's and MLflow's informational console output is shown (``--verbose``); otherwise only their errors."""


def set_verbose(verbose: bool) -> None:
    """Choose the console of this command and of the Ray jobs it starts (see :func:`mocolab.runtime.ray_job_env`);
    call it before MLflow is imported (MLflow reads ``MLFLOW_LOGGING_LEVEL`` then; a value set by the user wins)."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    level = os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    logging.getLogger("mlflow").setLevel(level)  # in case MLflow is imported already
    # MLflow's tqdm bars while it downloads a run's artifacts (e.g. backbone.pt before an evaluation)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true" if verbose else "false")


def is_verbose() -> bool:
    """Whether this process shows Ray's and MLflow's informational output (``MOCOLAB_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV) == "1"


REFRESH_S = 0.5
"""Least time between two bar updates sent to the driver."""
LINE_EVERY_S = 60.0
"""Time between two progress lines when the console is not a terminal."""
PROGRESS_ENV = "MOCOLAB_PROGRESS"


def progress_mode() -> str:
    """``bar`` when this command's console (stderr) is a terminal, else ``lines``; in a worker, the driver's choice
    (``MOCOLAB_PROGRESS``, set in the Ray job's environment)."""
    return os.environ.get(PROGRESS_ENV) or ("bar" if sys.stderr.isatty() else "lines")


def console(line: str) -> None:
    """Print one line to the process's real stdout (in a Ray worker, what Ray streams to the driver), once."""
    print(line, file=sys.__stdout__, flush=True)


def describe(label: str, loss: float | None, lr: float | None, images_per_s: float) -> str:
    """A bar's text: ``epoch 3/200  loss 6.1234  lr 0.03  812 img/s`` (no loss and lr before the first step)."""
    parts = [label] + ([f"loss {loss:.4f}", f"lr {lr:.4g}"] if loss is not None else [])
    return "  ".join(parts + [f"{images_per_s:,.0f} img/s"])


def progress_line(label: str, step: int, total: int, loss: float, lr: float, images_per_s: float, eta_s: float) -> str:
    """A progress line: ``[mocolab] epoch 3/200  step 1200/5004  loss 6.1234  lr 0.03  812 img/s  ETA 0:41:10``."""
    minutes, seconds = divmod(round(eta_s), 60)
    eta = f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"
    return f"[mocolab] {describe(f'{label}  step {step}/{total}', loss, lr, images_per_s)}  ETA {eta}"


class StepProgress:
    """Progress over ``total`` steps of a loop, labelled ``label`` plus the loss, lr and images/s so far: a bar or
    lines per :func:`progress_mode`.

    Inactive (``active=False``, e.g. on ranks other than 0) it does nothing. Use it as a context manager, or call
    :meth:`close`; ``label`` may change between steps (``"epoch 3/200"``)."""

    def __init__(self, label: str, total: int, active: bool = True):
        self.label, self.total = label, total
        self._bar = None
        self._lines = active and progress_mode() == "lines"
        if active and not self._lines:
            from ray.experimental.tqdm_ray import tqdm

            self._bar = tqdm(desc=label, total=total, unit="step", flush_interval_s=0)
        self._steps = self._images = 0
        self._loss: float | None = None
        self._lr: float | None = None
        self._started = time.perf_counter()
        self._sent = self._started if self._lines else float("-inf")

    def __enter__(self) -> StepProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def step(self, images: int, loss, lr: float) -> None:
        """One step over ``images`` images (all workers) with this ``loss`` (a number or a 0-d tensor, read only
        when an update is sent) and learning rate."""
        if self._bar is None and not self._lines:
            return
        self._steps += 1
        self._images += images
        now = time.perf_counter()
        if now - self._sent >= (LINE_EVERY_S if self._lines else REFRESH_S):
            self._loss, self._lr = float(loss), lr
            self._send(now)

    def _send(self, now: float) -> None:
        self._sent = now
        elapsed = max(now - self._started, 1e-9)
        if self._lines:
            eta = (self.total - self._steps) * elapsed / self._steps
            console(
                progress_line(self.label, self._steps, self.total, self._loss, self._lr, self._images / elapsed, eta)
            )
            return
        self._bar.n = self._steps
        self._bar.set_description(describe(self.label, self._loss, self._lr, self._images / elapsed))

    def close(self) -> None:
        """Send the bar's final state and close it (idempotent; lines: nothing, the caller's summary follows)."""
        if self._bar is None:
            return
        self._send(time.perf_counter())
        self._bar.close()
        self._bar = None
