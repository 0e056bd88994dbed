"""Fair wall-clock timing: warm-up, then interleaved repetitions whose every value is kept.

Repetitions alternate the order of the contenders (A B, B A, ...) so that drift in machine load (other
processes, thermal state) hits both alike; ``spread.Spread`` summarises the values.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU), so that a clock read covers the work it should."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], object], steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` consecutive calls of ``step``, device work included."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_rates(
    contenders: Mapping[str, Callable[[], object]],
    images_per_step: int,
    steps: int,
    repeats: int,
    warmup: int,
    device: torch.device,
) -> dict[str, list[float]]:
    """Images/s of each contender in each of ``repeats`` alternating rounds of ``steps`` steps, after ``warmup``
    untimed steps of each."""
    if steps < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"steps={steps} and repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    names = list(contenders)
    for name in names:
        time_steps(contenders[name], warmup, device)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            seconds = time_steps(contenders[name], steps, device)
            rates[name].append(images_per_step * steps / seconds)
    return rates
