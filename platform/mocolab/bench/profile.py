"""Where a step's time goes, from ``torch.profiler``: fractions of the step per phase.

``MoCo.forward`` marks its phases with ``torch.profiler.record_function`` ranges (names in
``mocolab.moco.model.PHASES``); the step here adds backward, optimizer and the whole step. On CPU a phase's
share is its ranges' wall time over the step ranges' wall time. On CUDA it is the GPU kernel time launched
inside its ranges over all kernel time; backward kernels are launched from autograd's device thread, outside
any range, so backward is what remains. Phases never overlap, so the fractions sum to at most 1.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from mocolab.bench.spec import StepSpec
from mocolab.bench.step import mocolab_contender
from mocolab.moco.model import PHASES
from mocolab.train.step import BACKWARD_RANGE, OPTIMIZER_RANGE

STEP_RANGE = "mocolab.step"


def _range_totals(events: Iterable[Any], names: set[str], cuda: bool) -> dict[str, float]:
    """Summed time (us) of the host-side ranges with these names: wall time on CPU, time of the kernels
    launched inside them on CUDA (the ranges' copies on the GPU timeline are not counted)."""
    totals = dict.fromkeys(names, 0.0)
    for event in events:
        if event.name in totals and event.device_type == DeviceType.CPU:
            totals[event.name] += event.device_time_total if cuda else event.cpu_time_total
    return totals


def _is_kernel(event: Any) -> bool:
    return event.device_type != DeviceType.CPU and not event.is_user_annotation


def phase_fractions(events: Iterable[Any], cuda: bool) -> dict[str, float]:
    """Fractions of the step per phase (``PHASES`` keys plus ``backward``, ``optimizer``, ``other``) from the
    profiler's function events of whole steps."""
    events = list(events)
    ranges = {STEP_RANGE, BACKWARD_RANGE, OPTIMIZER_RANGE, *PHASES.values()}
    totals = _range_totals(events, ranges, cuda)
    if cuda:
        step_total = sum(e.self_device_time_total for e in events if _is_kernel(e))
    else:
        step_total = totals[STEP_RANGE]
    if step_total <= 0:
        raise ValueError("the profile holds no timed mocolab.step ranges; profile whole steps")
    fractions = {phase: totals[name] / step_total for phase, name in PHASES.items()}
    fractions["optimizer"] = totals[OPTIMIZER_RANGE] / step_total
    if cuda:
        fractions["backward"] = max(0.0, 1.0 - sum(fractions.values()))
    else:
        fractions["backward"] = totals[BACKWARD_RANGE] / step_total
    fractions["other"] = max(0.0, 1.0 - sum(fractions.values()))
    return fractions


def profile_step(spec: StepSpec, steps: int = 5, warmup: int = 3) -> dict[str, float]:
    """Profile ``steps`` steps of mocolab's step for ``spec`` after ``warmup`` untimed ones; the phase fractions
    and ``momentum_queue_fraction`` (momentum update + queue update, the issue's <= 0.03 target)."""
    step = mocolab_contender(spec)
    for _ in range(warmup):
        step()
    cuda = torch.device(spec.device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function(STEP_RANGE):
                step()
        if cuda:
            torch.cuda.synchronize()
    fractions = phase_fractions(prof.events(), cuda)
    fractions["momentum_queue_fraction"] = fractions["momentum_update"] + fractions["queue_update"]
    return fractions
