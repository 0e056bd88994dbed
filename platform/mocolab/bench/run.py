"""The benchmarks of ``mocolab bench`` (``commands/bench.py``): where a MoCo run's time goes, and how mocolab
compares with what a user would run instead.

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

from pathlib import Path
from statistics import median
from typing import Any

PARTS = ("step", "reference", "data", "launcher", "fixed", "profile", "shuffle")


def step_spec(cfg, device: str, precision: str | None):
    """The benchmarked step of ``cfg``; a setting the benchmark cannot run is a ConfigError."""
    from mocolab.bench.spec import spec_from_config
    from mocolab.config import ConfigError

    try:
        return spec_from_config(cfg, device, precision)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def run_bench(
    cfg, spec, parts: tuple[str, ...], steps: int, repeats: int, rounds: int, epochs: int, workdir: Path
) -> dict[str, Any]:
    """Run the chosen parts of the benchmark of ``spec`` (the step of ``cfg``) and return the JSON record
    (``report.RESULT_KEYS``, the ratios' ``spread`` and the settings under ``settings``)."""
    import torch

    from mocolab.bench.report import empty_result, set_spread

    device = spec.device
    threads = torch.get_num_threads() if device == "cuda" else max(1, int(cfg.scaling.cpus_per_worker))
    torch.set_num_threads(threads)
    result = empty_result()
    result["settings"] = {
        **{k: getattr(spec, k) for k in spec.__dataclass_fields__},
        "threads": threads,
        "torch": torch.__version__,
        "parts": list(parts),
    }

    if {"step", "reference", "data"} & set(parts):
        from mocolab.bench.data import data_contender
        from mocolab.bench.step import REFERENCE, compare_steps

        extra = {"data": data_contender(cfg.data, cfg.train.batch_size, cfg.train.seed)} if "data" in parts else {}
        comparison = compare_steps(
            {"mocolab": spec},
            with_reference="reference" in parts,
            steps=steps,
            repeats=repeats,
            warmup=max(2, steps // 5),
            extra=extra,
        )
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
    from mocolab.bench.report import metrics_for_mlflow
    from mocolab.moco.mechanisms import run_params
    from mocolab.tracking.artifacts import log_file
    from mocolab.tracking.names import STAGE_BENCH
    from mocolab.tracking.runs import end_run, log_metrics, params_of, start_eval_run
    from mocolab.tracking.store import client_for

    params = {f"bench.{k}": v for k, v in result["settings"].items()} | params_of(cfg, run_params(cfg))
    run_id = start_eval_run(cfg, STAGE_BENCH, params, init="random", run_name=f"bench-{cfg.tracking.run_name}")
    log_metrics(client_for(cfg.tracking.tracking_uri), run_id, metrics_for_mlflow(result), step=0)
    log_file(cfg.tracking.tracking_uri, run_id, json_path)
    end_run(cfg.tracking.tracking_uri, run_id)
    return run_id
