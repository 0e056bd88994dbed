"""``mocolab bench``: where a MoCo run's time goes, and how mocolab's step compares with a plain reference loop.

Parts (``--what``, default all): ``step`` (mocolab's training step, images/s of one worker), ``reference``
(the textbook loop side by side, and the ratio), ``data`` (one loader worker's decode + two-crop augment),
``overhead`` (a real ``mocolab pretrain`` run's epoch throughput against the bare step in as many
processes as workers), ``fixed`` (command start to first step; checkpoint save/load time and size),
``profile`` (``torch.profiler`` breakdown of the step), ``shuffle`` (shuffle-BN's bytes per worker per step
for 2 to 64 workers and its time on 2 and 4 gloo processes, all-gather against all-to-all). With no
``--config`` it benchmarks the quickstart config on its bundled digits. Prints a table; ``--json`` writes the
record, ``--mlflow`` logs it as a run tagged ``mocolab.stage=bench``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from mocolab.cli import add_overrides_argument

PARTS = ("step", "reference", "data", "overhead", "fixed", "profile", "shuffle")


def parse_parts(text: str) -> tuple[str, ...]:
    """``"step,data"`` -> ``("step", "data")``; an unknown part is an argparse error naming the valid ones."""
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"unknown part(s) {unknown or [text]}; choose from {','.join(PARTS)}")
    return parts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML config to benchmark (default: experiments/pretrain/quickstart.yaml)")
    add_overrides_argument(parser, "override a config key, e.g. --set model.arch=resnet50 (repeatable)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--mlflow", action="store_true",
                        help="log the results to the config's MLflow store (run tagged mocolab.stage=bench)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="device of the step benchmarks (default: cuda if available, else cpu)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="step precision (default: the config's: bf16 autocast on cuda with train.amp, else fp32)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repetition (default 10)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="interleaved repetitions of step and reference; the median counts (default 5)")
    parser.add_argument("--what", type=parse_parts, default=PARTS, metavar="PARTS",
                        help=f"comma-separated parts to run (default: all of {','.join(PARTS)})")
    parser.add_argument("--epochs", type=int, default=2,
                        help="epochs of the timed pretraining run of overhead/fixed; the last one counts (default 2)")
    parser.add_argument("--data-images", type=int, default=512,
                        help="images timed through the data pipeline (default 512)")


def _check_args(args: argparse.Namespace) -> str:
    """The device to use; raises ConfigError for arguments that cannot run."""
    import torch

    from mocolab.config import ConfigError

    for name in ("steps", "repeats", "epochs", "data_images"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: this machine has no CUDA device visible to torch; use --device cpu")
    return device


def step_spec(cfg, device: str, precision: Optional[str]):
    """The benchmarked step of ``cfg``; a setting the benchmark cannot run is a ConfigError."""
    from mocolab.bench.spec import spec_from_config
    from mocolab.config import ConfigError

    try:
        return spec_from_config(cfg, device, precision)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def run_bench(cfg, spec, parts: tuple[str, ...], steps: int, repeats: int, epochs: int, data_images: int,
              workdir: Path) -> dict[str, Any]:
    """Run the chosen parts of the benchmark of ``spec`` (the step of ``cfg``) and return the JSON record
    (``report.RESULT_KEYS`` plus the settings under ``settings``)."""
    import torch

    from mocolab.bench.report import empty_result
    from mocolab.bench.spec import spec_from_config

    device = spec.device
    threads = torch.get_num_threads() if device == "cuda" else max(1, int(cfg.scaling.cpus_per_worker))
    torch.set_num_threads(threads)
    result = empty_result()
    result["settings"] = {**{k: getattr(spec, k) for k in spec.__dataclass_fields__}, "threads": threads,
                          "torch": torch.__version__, "parts": list(parts)}

    if "step" in parts or "reference" in parts:
        from mocolab.bench.step import REFERENCE, compare_steps

        comparison = compare_steps({"mocolab": spec}, with_reference="reference" in parts,
                                   steps=steps, repeats=repeats, warmup=max(2, steps // 5))
        result["step_img_s"] = comparison.img_s["mocolab"]
        result["reference_img_s"] = comparison.img_s.get(REFERENCE)
        result["ratio_vs_reference"] = comparison.ratio("mocolab")
    if "data" in parts:
        from mocolab.bench.data import data_throughput

        result["data_img_s_per_worker"] = data_throughput(cfg.data, cfg.train.batch_size, data_images, cfg.train.seed)
        if result["step_img_s"]:
            result["data_vs_step"] = result["data_img_s_per_worker"] / result["step_img_s"]
    if "overhead" in parts or "fixed" in parts:
        from mocolab.bench.overhead import (
            concurrent_step_throughput,
            platform_overhead,
            run_timed_pretrain,
            serial_data_throughput,
        )
        from mocolab.data.datasets import resolve_loader_workers

        times = run_timed_pretrain(cfg, workdir / "pretrain", epochs=epochs)
        result["startup_s"] = times.startup_s
        if "overhead" in parts:
            run_device = "cuda" if cfg.scaling.use_gpu else "cpu"
            bare_spec = spec_from_config(cfg, run_device)
            result["epoch_img_s"] = times.epoch_img_s[-1]
            result["bare_img_s"] = concurrent_step_throughput(
                bare_spec, processes=cfg.scaling.num_workers, threads=max(1, int(cfg.scaling.cpus_per_worker)),
                steps=steps, repeats=max(1, repeats // 2),
            )
            result["platform_overhead"] = platform_overhead(result["epoch_img_s"], result["bare_img_s"])
            if result["data_img_s_per_worker"] and resolve_loader_workers(cfg.data, cfg.scaling.cpus_per_worker) == 0:
                serial = serial_data_throughput(
                    result["bare_img_s"], result["data_img_s_per_worker"], cfg.scaling.num_workers
                )
                result["overhead_excl_data"] = platform_overhead(result["epoch_img_s"], serial)
    if "fixed" in parts:
        from mocolab.bench.fixed import checkpoint_cost

        cost = checkpoint_cost(spec, cfg.model_dump(mode="json"), directory=workdir)
        result.update(checkpoint_save_s=cost.save_s, checkpoint_load_s=cost.load_s, checkpoint_mb=cost.size_mb)
    if "profile" in parts:
        from mocolab.bench.profile import profile_step

        fractions = profile_step(spec, steps=min(steps, 5))
        result["momentum_queue_fraction"] = fractions.pop("momentum_queue_fraction")
        result["profile"] = fractions
    if "shuffle" in parts:
        from mocolab.bench.shuffle import shuffle_comparison

        result["shuffle"] = shuffle_comparison(spec.batch_size, spec.image_size, spec.dim, steps, repeats)
    return result


def log_to_mlflow(cfg, result: dict[str, Any], json_path: Path) -> str:
    """Log ``result`` as a run tagged ``mocolab.stage=bench`` in the config's store; returns its id."""
    from mocolab import tracking
    from mocolab.bench.report import metrics_for_mlflow

    params = {f"bench.{k}": v for k, v in result["settings"].items()} | tracking.params_of(cfg)
    run_id = tracking.start_eval_run(cfg, tracking.STAGE_BENCH, params, init="random", run_name=f"bench-{cfg.tracking.run_name}")
    tracking.log_metrics(tracking.client_for(cfg.tracking.tracking_uri), run_id, metrics_for_mlflow(result), step=0)
    tracking.log_file(cfg.tracking.tracking_uri, run_id, json_path)
    tracking.end_run(cfg.tracking.tracking_uri, run_id)
    return run_id


def main(args: argparse.Namespace) -> int:
    from mocolab.bench.report import result_table, write_json
    from mocolab.config import load_config
    from mocolab.quickstart import QUICKSTART_CONFIG

    started = time.time()
    device = _check_args(args)
    cfg = load_config(args.config or QUICKSTART_CONFIG, args.overrides)
    if args.mlflow:  # before the benchmark runs, not after
        from mocolab.tracking import check_reachable

        check_reachable(cfg.tracking.tracking_uri)
    spec = step_spec(cfg, device, args.precision)
    with tempfile.TemporaryDirectory(prefix="mocolab-bench-") as tmp:
        result = run_bench(cfg, spec, args.what, args.steps, args.repeats, args.epochs, args.data_images, Path(tmp))
        result["settings"]["config"] = str(args.config or QUICKSTART_CONFIG)
        result["settings"]["bench_wall_s"] = time.time() - started
        print(f"mocolab bench: {result['settings']['config']} ({device}, {result['settings']['threads']} threads)")
        print(result_table(result))
        json_path = args.json or Path(tmp) / "bench.json"
        write_json(result, json_path)
        if args.json:
            print(f"[mocolab] wrote {args.json}")
        if args.mlflow:
            run_id = log_to_mlflow(cfg, result, json_path)
            print(f"[mocolab] logged to MLflow run {run_id} (experiment '{cfg.tracking.experiment}')")
    return 0
