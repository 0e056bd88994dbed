"""``mocolab bench``: where a MoCo run's time goes, and how mocolab compares with what a user would run instead.

Parts (``--what``, default all): ``step`` (mocolab's training step, images/s of one worker), ``reference``
(the textbook loop side by side, and the ratio), ``data`` (one loader worker's decode + two-crop augment, timed
in alternation with the step; and the input pipelines' img/s per core x recipe on real JPEGs with the cores per GPU
a ``--step-rate`` needs, see :mod:`mocolab.bench.pipelines`), ``launcher`` (whole epochs of a real
``mocolab pretrain`` run against the same
config trained the official launcher's way, torch.multiprocessing spawn + DDP without Ray or MLflow, in
alternating rounds; and one evaluation of the distributed kNN monitor), ``fixed`` (command start to first step;
checkpoint save/load time and size), ``profile`` (``torch.profiler`` breakdown of the step), ``shuffle``
(shuffle-BN's bytes per worker per step for 2 to 64 workers and its time on 2 and 4 gloo processes, all-gather
against all-to-all). Every ratio comes with its spread over repetitions; where it is wider than +-5 % the table
says the machine is too noisy instead of giving a verdict. With no ``--config`` it benchmarks the quickstart
config on its bundled digits. Prints a table; ``--json`` writes the record, ``--mlflow`` logs it as a run tagged
``mocolab.stage=bench``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from statistics import median
from pathlib import Path
from typing import Any, Optional

from mocolab.cli import add_overrides_argument

PARTS = ("step", "reference", "data", "launcher", "fixed", "profile", "shuffle")


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
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                        help="step precision (default: the config's train.amp; off = fp32)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (and data batches) per repetition (default 10)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="interleaved repetitions of step, reference and data; ratios per repetition (default 5)")
    parser.add_argument("--what", type=parse_parts, default=PARTS, metavar="PARTS",
                        help=f"comma-separated parts to run (default: all of {','.join(PARTS)})")
    parser.add_argument("--rounds", type=int, default=3,
                        help="launcher: alternating rounds of a mocolab run and a launcher run (default 3)")
    parser.add_argument("--images", type=Path, default=None, metavar="DIR",
                        help="data: a folder of JPEGs for the input pipelines' table (default: scikit-learn's photos)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="data: the pipelines' output size (default: the config's data.image_size with --config, "
                             "else 224)")
    parser.add_argument("--data-images", type=int, default=256,
                        help="data: images per round of each pipeline; --repeats rounds (default 256)")
    parser.add_argument("--step-rate", type=float, default=None, metavar="R",
                        help="data: img/s one GPU's step consumes, for cores per GPU (default 3500, an H100's "
                             "ResNet-50 MoCo step in bf16)")
    parser.add_argument("--epochs", type=int, default=3,
                        help="epochs of each timed run of launcher/fixed; all but the first count (default 3)")


def _check_args(args: argparse.Namespace) -> str:
    """The device to use; raises ConfigError for arguments that cannot run."""
    import torch

    from mocolab.config import ConfigError

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


def step_spec(cfg, device: str, precision: Optional[str]):
    """The benchmarked step of ``cfg``; a setting the benchmark cannot run is a ConfigError."""
    from mocolab.bench.spec import spec_from_config
    from mocolab.config import ConfigError

    try:
        return spec_from_config(cfg, device, precision)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def run_bench(cfg, spec, parts: tuple[str, ...], steps: int, repeats: int, rounds: int, epochs: int,
              workdir: Path) -> dict[str, Any]:
    """Run the chosen parts of the benchmark of ``spec`` (the step of ``cfg``) and return the JSON record
    (``report.RESULT_KEYS``, the ratios' ``spread`` and the settings under ``settings``)."""
    import torch

    from mocolab.bench.report import empty_result, set_spread

    device = spec.device
    threads = torch.get_num_threads() if device == "cuda" else max(1, int(cfg.scaling.cpus_per_worker))
    torch.set_num_threads(threads)
    result = empty_result()
    result["settings"] = {**{k: getattr(spec, k) for k in spec.__dataclass_fields__}, "threads": threads,
                          "torch": torch.__version__, "parts": list(parts)}

    if {"step", "reference", "data"} & set(parts):
        from mocolab.bench.data import data_contender
        from mocolab.bench.step import REFERENCE, compare_steps

        extra = {"data": data_contender(cfg.data, cfg.train.batch_size, cfg.train.seed)} if "data" in parts else {}
        comparison = compare_steps({"mocolab": spec}, with_reference="reference" in parts, steps=steps,
                                   repeats=repeats, warmup=max(2, steps // 5), extra=extra)
        result["step_img_s"] = comparison.img_s["mocolab"]
        if "reference" in parts:
            result["reference_img_s"] = comparison.img_s[REFERENCE]
            set_spread(result, "ratio_vs_reference", comparison.ratio("mocolab"))
        if "data" in parts:
            result["data_img_s_per_worker"] = comparison.img_s["data"]
            set_spread(result, "data_vs_step", comparison.ratio("data", over="mocolab"))
    first_run = None
    if "launcher" in parts:
        from mocolab.bench.launcher import compare_with_launcher

        launcher = compare_with_launcher(cfg, epochs, rounds, workdir / "launcher")
        first_run = launcher.mocolab[0]
        result["epoch_img_s"] = median([m.epochs.img_s for m in launcher.mocolab])
        result["launcher_img_s"] = median([b.epochs.img_s for b in launcher.launcher])
        set_spread(result, "epoch_ratio_vs_launcher", launcher.epoch_ratio())
        set_spread(result, "loop_ratio_vs_launcher", launcher.loop_ratio())
        result["between_epochs_s"] = median([m.epochs.between_epochs_s for m in launcher.mocolab])
        result["launcher_between_epochs_s"] = median([b.epochs.between_epochs_s for b in launcher.launcher])
        result["knn_s"] = median([b.knn_s for b in launcher.launcher])
        set_spread(result, "knn_vs_epoch", launcher.knn_vs_epoch())
    if "fixed" in parts:
        from mocolab.bench.fixed import checkpoint_cost
        from mocolab.bench.pretrain_run import run_timed_pretrain

        result["startup_s"] = (first_run or run_timed_pretrain(cfg, workdir / "pretrain", epochs=epochs)).startup_s
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


def data_pipelines(args: argparse.Namespace, cfg) -> dict[str, Any]:
    """The input pipelines' record (:mod:`mocolab.bench.pipelines`): ``images``, ``step_rate`` and ``rows``."""
    from mocolab.bench.pipelines import DEFAULT_STEP_RATE, image_bytes, pipeline_rows
    from mocolab.config import ConfigError

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
