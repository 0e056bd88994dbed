"""Shuffle-BN's cost per worker and step: the all-to-all shuffle against the official all-gather one.

Bytes received per worker per step (analytic; one key pass of the ``moco`` mechanism: ``B`` key crops of
``3 x S x S`` fp32, as the loader yields them whatever the autocast precision, and ``B`` keys of ``dim`` fp32)::

    gather:      (W - 1) * B * (crop + key) + 8 * W * B
    all_to_all:  (W - 1) / W * B * (crop + key) + 8 * W * B

``crop = 3 * S * S * 4``, ``key = dim * 4`` bytes; ``8 * W * B`` is the int64 permutation broadcast from rank 0
(what every other rank receives). The gather shuffle all-gathers every crop and the unshuffle every key; the
all-to-all moves only the rows whose slot is on another worker: a slot holds one of the global batch's samples
uniformly at random, its own worker's with probability ``1 / W``, so the all-to-all figure is the expectation.
Rows a worker keeps are copied in memory, not received. (End-to-end keys add a backward: the gather's
all-reduce of ``[W * B, dim]`` gradients against the all-to-all's reverse exchange of ``B`` rows.)

Seconds: shuffle + unshuffle of such a batch, both implementations on ``W`` real gloo processes of one thread on
this machine (a window's time is its slowest rank's; median over interleaved rounds).
"""

from __future__ import annotations

import socket
import statistics
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mocolab.bench.timing import time_steps

IMPLS = ("gather", "all_to_all")
ANALYTIC_WORKERS = (2, 4, 8, 16, 32, 64)
TIMED_WORKERS = (2, 4)
FP32_BYTES = 4
INDEX_BYTES = 8  # the int64 permutation


def bytes_received_per_worker(impl: str, workers: int, batch: int, image_size: int, dim: int) -> float:
    """Bytes a (non-zero rank) worker receives per step for shuffle + unshuffle (see the module's formula)."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {', '.join(IMPLS)}")
    row = 3 * image_size * image_size * FP32_BYTES + dim * FP32_BYTES
    foreign_rows = (workers - 1) * batch if impl == "gather" else (workers - 1) / workers * batch
    return foreign_rows * row + INDEX_BYTES * workers * batch


def shuffle_rows(batch: int, image_size: int, dim: int, seconds: dict[int, dict[str, float]]) -> list[dict[str, Any]]:
    """One row per worker count of ``ANALYTIC_WORKERS``: bytes of both implementations, their ratio
    (all-to-all / gather), and where ``seconds`` has the count (``{workers: {impl: s}}``) the measured seconds
    and their ratio; ``None`` where not measured."""
    rows = []
    for workers in ANALYTIC_WORKERS:
        got = {impl: bytes_received_per_worker(impl, workers, batch, image_size, dim) for impl in IMPLS}
        timed = seconds.get(workers)
        rows.append(
            {
                "workers": workers,
                "gather_bytes": round(got["gather"]),
                "all_to_all_bytes": round(got["all_to_all"]),
                "bytes_ratio": got["all_to_all"] / got["gather"],
                "gather_s": timed["gather"] if timed else None,
                "all_to_all_s": timed["all_to_all"] if timed else None,
                "time_ratio": timed["all_to_all"] / timed["gather"] if timed else None,
            }
        )
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _round_trip(shuffle, unshuffle, crops: torch.Tensor, keys: torch.Tensor) -> None:
    _, undo = shuffle(crops)
    unshuffle(keys, undo)


def _timing_worker(
    rank: int, workers: int, port: int, shape: tuple[int, int, int], steps: int, repeats: int, warmup: int, results
) -> None:
    """One gloo rank of :func:`time_shuffles`; rank 0 puts ``{impl: median seconds per step}`` on ``results``."""
    from mocolab.moco import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=workers)
    try:
        batch, image_size, dim = shape
        crops, keys = torch.randn(batch, 3, image_size, image_size), torch.randn(batch, dim)
        pairs = {
            "gather": (distributed.shuffle_by_gather, distributed.unshuffle_by_gather),
            "all_to_all": (distributed.shuffle_across_workers, distributed.unshuffle_across_workers),
        }
        step = {impl: (lambda pair=pair: _round_trip(*pair, crops, keys)) for impl, pair in pairs.items()}
        cpu = torch.device("cpu")
        for impl in IMPLS:
            time_steps(step[impl], warmup, cpu)
        seconds: dict[str, list[float]] = {impl: [] for impl in IMPLS}
        for r in range(repeats):
            for impl in IMPLS if r % 2 == 0 else reversed(IMPLS):
                dist.barrier()
                slowest = torch.tensor(time_steps(step[impl], steps, cpu) / steps)
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                seconds[impl].append(float(slowest))
        if rank == 0:
            results.put({impl: statistics.median(values) for impl, values in seconds.items()})
    finally:
        dist.destroy_process_group()


def time_shuffles(
    workers: int, batch: int, image_size: int, dim: int, steps: int, repeats: int, warmup: int | None = None
) -> dict[str, float]:
    """Median seconds per step of shuffle + unshuffle (crops ``[B, 3, S, S]``, keys ``[B, dim]``, fp32) of each
    implementation on ``workers`` gloo processes."""
    if steps < 1 or repeats < 1:
        raise ValueError(f"steps={steps} and repeats={repeats} must be >= 1")
    warmup = max(2, steps // 5) if warmup is None else warmup
    context = mp.get_context("forkserver")  # a clean server imports torch once; each rank is forked from it
    context.set_forkserver_preload([__name__, "mocolab.moco.distributed"])
    results = context.SimpleQueue()
    args = (workers, _free_port(), (batch, image_size, dim), steps, repeats, warmup, results)
    mp.start_processes(_timing_worker, args=args, nprocs=workers, start_method="forkserver")
    return results.get()


def shuffle_comparison(batch: int, image_size: int, dim: int, steps: int, repeats: int) -> list[dict[str, Any]]:
    """:func:`shuffle_rows` with both implementations timed on ``TIMED_WORKERS`` gloo processes."""
    seconds = {w: time_shuffles(w, batch, image_size, dim, steps, repeats) for w in TIMED_WORKERS}
    return shuffle_rows(batch, image_size, dim, seconds)
