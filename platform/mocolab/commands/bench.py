"""``mocolab bench [--config CONFIG] [--what PARTS] [--json PATH] [--mlflow] ...``: the benchmarks of
:mod:`mocolab.bench.run` (default: the quickstart config on its bundled digits), as a table."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from mocolab.bench.run import PARTS, log_to_mlflow, run_bench, step_spec
from mocolab.cli import add_overrides_argument
from mocolab.config import ConfigError, load_config
from mocolab.quickstart import QUICKSTART_CONFIG
from mocolab.tracking.store import check_reachable


def parse_parts(text: str) -> tuple[str, ...]:
    """``"step,data"`` -> ``("step", "data")``; an unknown part is an argparse error naming the valid ones."""
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"unknown part(s) {unknown or [text]}; choose from {','.join(PARTS)}")
    return parts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML config to benchmark (default: experiments/pretrain/quickstart.yaml)",
    )
    add_overrides_argument(parser, "override a config key, e.g. --set model.arch=resnet50 (repeatable)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the results as JSON")
    parser.add_argument(
        "--mlflow",
        action="store_true",
        help="log the results to the config's MLflow store (run tagged mocolab.stage=bench)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="device of the step benchmarks (default: cuda if available, else cpu)",
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default=None,
        help="step precision (default: the config's train.amp; off = fp32)",
    )
    parser.add_argument(
        "--steps", type=int, default=10, help="timed steps (and data batches) per repetition (default 10)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="interleaved repetitions of step, reference and data; ratios per repetition (default 5)",
    )
    parser.add_argument(
        "--what",
        type=parse_parts,
        default=PARTS,
        metavar="PARTS",
        help=f"comma-separated parts to run (default: all of {','.join(PARTS)})",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="launcher: alternating rounds of a mocolab run and a launcher run (default 3)",
    )
    parser.add_argument(
        "--images",
        type=Path,
        default=None,
        metavar="DIR",
        help="data: a folder of JPEGs for the input pipelines' table (default: scikit-learn's photos)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="data: the pipelines' output size (default: the config's data.image_size with --config, else 224)",
    )
    parser.add_argument(
        "--data-images",
        type=int,
        default=256,
        help="data: images per round of each pipeline; --repeats rounds (default 256)",
    )
    parser.add_argument(
        "--step-rate",
        type=float,
        default=None,
        metavar="R",
        help="data: img/s one GPU's step consumes, for cores per GPU (default 3500, an H100's "
        "ResNet-50 MoCo step in bf16)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=3,
        help="epochs of each timed run of launcher/fixed; all but the first count (default 3)",
    )


def _check_args(args: argparse.Namespace) -> str:
    """The device to use; raises ConfigError for arguments that cannot run."""
    import torch

    for name in ("steps", "repeats", "rounds", "data_images"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.step_rate is not None and args.step_rate <= 0:
        raise ConfigError(f"--step-rate={args.step_rate} must be > 0 (img/s of one GPU's step)")
    if args.image_size is not None and args.image_size < 8:
        raise ConfigError(f"--image-size={args.image_size} must be >= 8")
    if args.images is not None and not args.images.is_dir():
        raise ConfigError(f"--images {args.images}: not a folder; give a folder of JPEGs")
    if args.epochs < 2:
        raise ConfigError(f"--epochs={args.epochs} must be >= 2 (the first epoch of a timed run is warm-up)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: this machine has no CUDA device visible to torch; use --device cpu")
    return device


def data_pipelines(args: argparse.Namespace, cfg) -> dict[str, Any]:
    """The input pipelines' record (:mod:`mocolab.bench.pipelines`): ``images``, ``step_rate`` and ``rows``."""
    from mocolab.bench.pipelines import DEFAULT_STEP_RATE, image_bytes, pipeline_rows

    size = args.image_size or (cfg.data.image_size if args.config else 224)
    step_rate = args.step_rate or DEFAULT_STEP_RATE
    try:
        blobs, source = image_bytes(args.images)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    rows = pipeline_rows(blobs, size, args.data_images, args.repeats, step_rate)
    return {"images": source, "step_rate": step_rate, "rows": rows}


def main(args: argparse.Namespace) -> int:
    from mocolab.bench.report import result_table, write_json

    started = time.time()
    device = _check_args(args)
    cfg = load_config(args.config or QUICKSTART_CONFIG, args.overrides)
    if args.mlflow:  # before the benchmark runs, not after
        check_reachable(cfg.tracking.tracking_uri)
    spec = step_spec(cfg, device, args.precision)
    with tempfile.TemporaryDirectory(prefix="mocolab-bench-") as tmp:
        result = run_bench(cfg, spec, args.what, args.steps, args.repeats, args.rounds, args.epochs, Path(tmp))
        if "data" in args.what:
            result["data_pipelines"] = data_pipelines(args, cfg)
        result["settings"]["config"] = str(args.config or QUICKSTART_CONFIG)
        result["settings"]["bench_wall_s"] = time.time() - started
        print(f"mocolab bench: {result['settings']['config']} ({device}, {result['settings']['threads']} threads)")
        print(result_table(result))
        if "data" in args.what:
            from mocolab.bench.pipelines import pipeline_table

            print(pipeline_table(**result["data_pipelines"]))
        json_path = args.json or Path(tmp) / "bench.json"
        write_json(result, json_path)
        if args.json:
            print(f"[mocolab] wrote {args.json}")
        if args.mlflow:
            run_id = log_to_mlflow(cfg, result, json_path)
            print(f"[mocolab] logged to MLflow run {run_id} (experiment '{cfg.tracking.experiment}')")
    return 0
