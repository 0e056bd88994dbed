"""Platform overhead and start-up: a real ``mocolab pretrain`` run against the bare step on the same hardware.

The run is a subprocess (``python -m mocolab.cli pretrain``, so start-up is measured from a fresh command)
of the benchmarked config for a few epochs, without kNN monitor or evaluations, logging to a throw-away
MLflow store. Its per-epoch ``throughput_img_s`` (which excludes start-up) is compared with the bare step
run at the same time in as many processes as the run has workers, each with the worker's CPUs as threads:
``platform_overhead = 1 - epoch throughput / bare throughput`` (data loading, gradient all-reduce,
shuffle-BN collectives, Ray and logging all count as overhead). Start-up is the time from the command's
start to its first step: the first epoch's metric timestamp minus that epoch's duration.

Where the workers load their batches in the training process (``data.loader_workers`` 0, the CPU configs),
decoding and augmenting is serial with the step; ``serial_data_throughput`` then gives the throughput the run
could reach with the data pipeline but no other platform cost, so the overhead beyond data loading can be told
apart (Ray, gradient and shuffle-BN collectives, logging).
"""

from __future__ import annotations

import multiprocessing
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from mocolab.bench.spec import StepSpec

RUN_EXPERIMENT = "mocolab-bench"
OUTPUT_TAIL_CHARS = 3000


@dataclass(frozen=True)
class PretrainTimes:
    """What a timed ``mocolab pretrain`` run reports: per-epoch global images/s and seconds, start-up."""

    epoch_img_s: list[float]
    epoch_time_s: list[float]
    startup_s: float
    wall_s: float


def bench_run_config(cfg, epochs: int, workdir: Path) -> dict:
    """``cfg`` as a raw dict for a short timed run: ``epochs`` epochs, no kNN monitor, no evaluations, one
    checkpoint at the end, a fresh run name, Ray results and MLflow store under ``workdir``."""
    raw = cfg.model_dump(mode="json")
    raw["train"].update(epochs=epochs, knn_every=0, checkpoint_every=epochs, max_failures=0)
    raw["eval"] = {"lincls": None, "detection": None}
    raw["scaling"]["storage_path"] = str(workdir / "ray_results")
    raw["tracking"] = {
        "experiment": RUN_EXPERIMENT,
        "run_name": f"bench-{time.strftime('%Y%m%d-%H%M%S')}",
        "tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}",
    }
    return raw


def run_timed_pretrain(cfg, workdir: Path, epochs: int = 2, timeout_s: float = 3600) -> PretrainTimes:
    """Run ``mocolab pretrain`` on ``cfg`` (see :func:`bench_run_config`) in a subprocess and read its
    per-epoch metrics back from MLflow. Raises RuntimeError with the run's output tail if it fails."""
    from mocolab import tracking

    workdir.mkdir(parents=True, exist_ok=True)
    raw = bench_run_config(cfg, epochs, workdir)
    config_path = workdir / "bench_pretrain.yaml"
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "mocolab.cli", "pretrain", str(config_path)],
        cwd=workdir, capture_output=True, text=True, timeout=timeout_s,
    )
    wall = time.time() - started
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-OUTPUT_TAIL_CHARS:]
        raise RuntimeError(f"the timed pretraining run failed (exit {proc.returncode}); its output ends:\n{tail}")
    client = tracking.client_for(raw["tracking"]["tracking_uri"])
    run = tracking.find_run(client, RUN_EXPERIMENT, raw["tracking"]["run_name"])
    if run is None:
        raise RuntimeError(f"the timed pretraining run left no MLflow run named {raw['tracking']['run_name']}")
    times = sorted(client.get_metric_history(run.info.run_id, "epoch_time_s"), key=lambda m: m.step)
    rates = sorted(client.get_metric_history(run.info.run_id, "throughput_img_s"), key=lambda m: m.step)
    if len(times) != epochs or len(rates) != epochs:
        raise RuntimeError(f"the timed run logged {len(times)} of {epochs} epochs of epoch_time_s")
    first_step_at = times[0].timestamp / 1000.0 - times[0].value
    return PretrainTimes(
        epoch_img_s=[m.value for m in rates],
        epoch_time_s=[m.value for m in times],
        startup_s=first_step_at - started,
        wall_s=wall,
    )


def _bare_worker(spec: StepSpec, threads: int, steps: int, repeats: int, warmup: int, barrier) -> float:
    """One process of :func:`concurrent_step_throughput`: median images/s of the step on ``threads`` threads."""
    from mocolab.bench.step import mocolab_contender
    from mocolab.bench.timing import time_steps

    torch.set_num_threads(threads)
    step = mocolab_contender(spec)
    device = torch.device(spec.device)
    barrier.wait()  # every process warm and ready: the timed windows overlap
    time_steps(step, warmup, device)
    rates = [spec.batch_size * steps / time_steps(step, steps, device) for _ in range(repeats)]
    return statistics.median(rates)


def concurrent_step_throughput(
    spec: StepSpec, processes: int, threads: int, steps: int = 10, repeats: int = 3, warmup: int = 2
) -> float:
    """Total images/s of the bare step run at the same time in ``processes`` processes of ``threads``
    threads each (on CUDA, process ``i`` uses GPU ``i``): what ``processes`` workers could do on this machine
    with no platform around the step."""
    specs = [spec] * processes
    if spec.device.startswith("cuda"):
        if torch.cuda.device_count() < processes:
            raise ValueError(f"the bare step needs {processes} GPUs (one per worker); {torch.cuda.device_count()} visible")
        specs = [spec.replace(device=f"cuda:{i}") for i in range(processes)]
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(max_workers=processes, mp_context=context) as pool:
        barrier = manager.Barrier(processes)
        futures = [pool.submit(_bare_worker, s, threads, steps, repeats, warmup, barrier) for s in specs]
        return sum(f.result() for f in futures)


def platform_overhead(epoch_img_s: float, bare_img_s: float) -> float:
    """The fraction of the bare step's throughput lost end to end (0.03 = 3 %; negative if the run was faster)."""
    if bare_img_s <= 0:
        raise ValueError(f"bare step throughput {bare_img_s} must be > 0")
    return 1.0 - epoch_img_s / bare_img_s


def serial_data_throughput(bare_img_s: float, data_img_s_per_worker: float, workers: int) -> float:
    """Images/s of ``workers`` workers that each load a batch (at ``data_img_s_per_worker``) and then step it
    (together at ``bare_img_s``), with nothing else in between."""
    return 1.0 / (1.0 / bare_img_s + 1.0 / (workers * data_img_s_per_worker))
