"""``mocolab pretrain CONFIG [--set k=v ...]``: the driver of a pretraining run.

The driver creates (or, for an unfinished run of the same ``tracking.run_name``, resumes) the MLflow
run, starts Ray if needed, fits a :class:`ray.train.torch.TorchTrainer` running
:func:`mocolab.train.pretrain.train_loop` on ``scaling.num_workers`` workers, logs the final backbone as
``backbone.pt`` and marks the run FINISHED; then it runs the evaluations configured under ``eval``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from mocolab import tracking
from mocolab.cli import add_overrides_argument
from mocolab.config import Config, load_config
from mocolab.train.pretrain import BACKBONE_FILE, NonFiniteLossError, loop_config, train_loop
from mocolab.train.resume import NoLoadableCheckpointError


def ensure_ray() -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` (set by ``ray job submit``), or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", include_dashboard=False)


def build_trainer(cfg: Config, run_id: str, callbacks: Sequence[Any] = ()):
    """The TorchTrainer of a pretraining run: Ray run name = ``tracking.run_name`` (same name resumes)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config(cfg, run_id),
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.tracking.run_name,
            storage_path=cfg.scaling.storage_path,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=list(callbacks),
        ),
    )


def finish_pretrain_run(cfg: Config, run_id: str, result) -> None:
    """After ``fit``: stop on a non-finite loss or on a run none of whose checkpoints loads, else log
    ``backbone.pt`` and mark the run FINISHED."""
    uri = cfg.tracking.tracking_uri
    tags = tracking.client_for(uri).get_run(run_id).data.tags
    unloadable = tags.get(tracking.NO_LOADABLE_CHECKPOINT_TAG)
    if unloadable:
        tracking.end_run(uri, run_id, status="FAILED")
        raise NoLoadableCheckpointError(f"run '{cfg.tracking.run_name}': {unloadable}")
    nonfinite = tags.get(tracking.NONFINITE_LOSS_TAG)
    if nonfinite:
        tracking.end_run(uri, run_id, status="FAILED")
        kept = result.checkpoint.path if result.checkpoint is not None else "none (no epoch completed)"
        raise NonFiniteLossError(
            f"run '{cfg.tracking.run_name}': NaN/inf {nonfinite}; stopped without retry. Last good checkpoint: "
            f"{kept}. Lower train.lr, add train.warmup_epochs or check the data, then start a new run."
        )
    if result.checkpoint is None:
        raise RuntimeError(f"run '{cfg.tracking.run_name}' ended without a checkpoint; nothing to export")
    with result.checkpoint.as_directory() as directory:
        backbone = Path(directory) / BACKBONE_FILE
        if not backbone.is_file():
            raise RuntimeError(f"the final checkpoint {result.checkpoint.path} has no {BACKBONE_FILE}")
        tracking.log_file(uri, run_id, backbone)
    tracking.end_run(uri, run_id, status="FINISHED")


def run_pretrain(cfg: Config) -> str:
    """Pretrain per ``cfg`` (resuming an unfinished run of the same name), then run ``eval.*``.

    Returns the MLflow run id. Raises ConfigError before any compute if the run name is taken by a
    FINISHED run, the tracking store is unreachable or the storage path is unusable."""
    from mocolab.storage import check_storage_path

    if cfg.moco.mechanism == "memory_bank":  # one stored key per training image: check K against their number
        from mocolab.config import ConfigError
        from mocolab.data.datasets import dataset_size
        from mocolab.moco.dictionary import check_mechanism

        try:
            check_mechanism(cfg, dataset_size(cfg.data))
        except ValueError as err:
            raise ConfigError(str(err)) from None
    check_storage_path(cfg.scaling.storage_path)
    run_id, resumed = tracking.start_pretrain_run(cfg)
    print(
        f"[mocolab] {'resuming' if resumed else 'starting'} run '{cfg.tracking.run_name}' "
        f"(MLflow run {run_id}, experiment '{cfg.tracking.experiment}', {tracking.redact(cfg.tracking.tracking_uri)})",
        flush=True,
    )
    if resumed:  # a stop recorded by an earlier attempt is not this attempt's
        client = tracking.client_for(cfg.tracking.tracking_uri)
        for tag in (tracking.NONFINITE_LOSS_TAG, tracking.NO_LOADABLE_CHECKPOINT_TAG):
            if tag in client.get_run(run_id).data.tags:
                client.delete_tag(run_id, tag)
    ensure_ray()
    try:
        result = build_trainer(cfg, run_id).fit()
    except KeyboardInterrupt:
        tracking.end_run(cfg.tracking.tracking_uri, run_id, status="KILLED")
        raise
    except Exception:
        tracking.end_run(cfg.tracking.tracking_uri, run_id, status="FAILED")
        raise
    finish_pretrain_run(cfg, run_id, result)
    if cfg.eval.lincls is not None or cfg.eval.detection is not None:
        from mocolab.evaluate.pipeline import run_configured_evals

        run_configured_evals(cfg, run_id)
    return run_id


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (see experiments/pretrain/)")
    add_overrides_argument(parser)


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    try:
        run_id = run_pretrain(cfg)
    except (NonFiniteLossError, NoLoadableCheckpointError) as err:
        print(f"mocolab pretrain: {err}", file=sys.stderr)
        return 1
    print(f"[mocolab] run '{cfg.tracking.run_name}' finished: MLflow run {run_id}", flush=True)
    return 0
