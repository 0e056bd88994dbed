"""Compute accounting: what a run cost in worker-seconds, device-hours and, given a price, money. Pure arithmetic.

A run's workers hold their resources for the wall time of its Ray Train fit (start-up, training, retries):
``worker_seconds = num_workers x wall seconds``. A device is what one pays for per worker: a GPU with
``scaling.use_gpu`` (one per worker), else a CPU core (``scaling.cpus_per_worker`` per worker), so
``device_hours = worker_seconds x devices per worker / 3600`` and ``cost = device_hours x
tracking.price_per_device_hour``. A run started again (resumed) adds each attempt's usage to its totals.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class ComputeUsage:
    """Worker-seconds, device-hours and cost (None without a price) of one run or attempt, or of several."""

    worker_seconds: float
    device_hours: float
    cost: float | None = None

    def __add__(self, other: ComputeUsage) -> ComputeUsage:
        costs = [c for c in (self.cost, other.cost) if c is not None]
        return ComputeUsage(
            self.worker_seconds + other.worker_seconds,
            self.device_hours + other.device_hours,
            sum(costs) if costs else None,
        )


NONE = ComputeUsage(0.0, 0.0)


def devices_per_worker(use_gpu: bool, cpus_per_worker: float) -> float:
    """Devices one worker holds: its GPU, or its CPU cores."""
    return 1.0 if use_gpu else float(cpus_per_worker)


def usage(wall_s: float, num_workers: int, devices: float, price_per_device_hour: float | None = None) -> ComputeUsage:
    """The usage of ``num_workers`` workers of ``devices`` devices each held for ``wall_s`` seconds."""
    if wall_s < 0 or num_workers < 1 or devices <= 0:
        raise ValueError(f"wall_s={wall_s}, num_workers={num_workers} and devices={devices} must be >= 0, >= 1, > 0")
    worker_seconds = wall_s * num_workers
    device_hours = worker_seconds * devices / 3600.0
    cost = device_hours * price_per_device_hour if price_per_device_hour is not None else None
    return ComputeUsage(worker_seconds, device_hours, cost)


def total(usages: Iterable[ComputeUsage]) -> ComputeUsage:
    """The sum of ``usages`` (cost: the sum of the known costs, None if none is known)."""
    result = NONE
    for item in usages:
        result = result + item
    return result
