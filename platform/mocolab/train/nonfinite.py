"""A NaN/inf loss ends a run at once, without retry, with one line saying where and what to change.

The one mechanism of every training loop (pretraining, linear eval, detection): every worker learns of a
non-finite loss at the same step through a collective (the evaluation loops check each step's mean loss over
all workers, :func:`worker_mean`; pretraining keeps its losses on the device and checks every
``train.check_finite_every`` steps, ``train/step.LossWatch``), so that every rank stops together and none is left
waiting in the next all-reduce; rank 0 records where it happened in the MLflow tag ``mocolab.nonfinite_loss``
(:func:`record_nonfinite`); every rank then returns normally, so Ray does not retry; the driver turns the tag
into :class:`NonFiniteLossError` and marks the run FAILED (:func:`raise_if_nonfinite`); ``mocolab`` prints the
error's one line and exits with code 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mocolab.console import console

INJECT_NAN_STEP_KEY = "inject_nan_loss_at_step"
"""Fault injection for tests of the NaN path of the evaluation loops: a ``train_loop_config`` key whose value
is the optimisation step (1-based, counted over the whole run) at which the last worker's loss is made NaN
(the others must learn it from the all-reduce). Never set by mocolab itself (pretraining has its own, per epoch:
``train.pretrain.INJECT_NAN_KEY``)."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf: the run stopped without retry (a pretraining run keeps its last good
    checkpoint)."""


def worker_mean(loss, world_size: int) -> float:
    """The mean of ``loss`` over the workers (one all-reduce when ``world_size > 1``; every rank must call it at
    the same step). NaN/inf as soon as one worker's loss is."""
    import torch.distributed as dist

    value = loss.detach().float().reshape(1).clone()
    if world_size > 1:
        dist.all_reduce(value)
    return value.item() / world_size


def checked_mean_loss(
    loss,
    world_size: int,
    rank: int,
    step: int,
    inject_at,
    tracking_uri: str,
    run_id: str,
    where: Callable[[float], str],
) -> float | None:
    """One step of an evaluation loop's NaN/inf check: the mean of ``loss`` over the workers
    (:func:`worker_mean`), or None when it is not finite, after rank 0 has recorded ``where(mean)``
    (:func:`record_nonfinite`); every rank must then return. ``inject_at``: the step at which the last worker's
    loss is made NaN (fault injection, :data:`INJECT_NAN_STEP_KEY`)."""
    if step == inject_at and rank == world_size - 1:
        loss = loss * float("nan")
    mean = worker_mean(loss, world_size)
    if math.isfinite(mean):
        return mean
    if rank == 0:
        record_nonfinite(tracking_uri, run_id, where(mean))
    return None


@dataclass
class LossGuard:
    """The NaN/inf check of an evaluation loop's steps (linear eval, detection), bound to its run and progress bar:
    :meth:`mean` is :func:`checked_mean_loss` that also closes the bar when the loss is not finite."""

    bar: Any  # console.StepProgress
    world_size: int
    rank: int
    inject_at: int | None  # INJECT_NAN_STEP_KEY's step, or None
    tracking_uri: str
    run_id: str | None

    def mean(self, loss, step: int, where: Callable[[float], str]) -> float | None:
        """The mean of ``loss`` over the workers, or None (bar closed, rank 0 recorded ``where(mean)``): every rank
        must then return."""
        mean = checked_mean_loss(
            loss, self.world_size, self.rank, step, self.inject_at, self.tracking_uri, self.run_id, where
        )
        if mean is None:
            self.bar.close()
        return mean


def record_nonfinite(tracking_uri: str, run_id: str, where: str) -> None:
    """Rank 0: file ``where`` (e.g. ``loss nan at iteration 56``) as the run's ``mocolab.nonfinite_loss``
    tag and print it to the worker's log."""
    from mocolab.tracking.names import NONFINITE_LOSS_TAG
    from mocolab.tracking.store import client_for

    client_for(tracking_uri).set_tag(run_id, NONFINITE_LOSS_TAG, where)
    console(f"[mocolab] {where}: stopping without retry")


def raise_if_nonfinite(tracking_uri: str, run_id: str, what: str, fix: str) -> None:
    """Driver, after ``fit``: if the run's workers recorded a NaN/inf loss, mark the run FAILED and raise
    :class:`NonFiniteLossError` ``"<what>: NaN/inf <where>; stopped without retry. <fix>"``."""
    from mocolab.tracking.names import NONFINITE_LOSS_TAG
    from mocolab.tracking.runs import end_run
    from mocolab.tracking.store import client_for

    where = client_for(tracking_uri).get_run(run_id).data.tags.get(NONFINITE_LOSS_TAG)
    if where:
        end_run(tracking_uri, run_id, status="FAILED")
        raise NonFiniteLossError(f"{what}: NaN/inf {where}; stopped without retry. {fix}")
