"""The driver side of a pretraining run: fit the Ray Train loop, then close the MLflow run.

``fit_pretrain`` runs :func:`mocolab.train.pretrain.train_loop` on ``scaling.num_workers`` workers under the Ray
run name ``tracking.run_name`` (the same name resumes from its last checkpoint); ``finish_pretrain_run`` turns a
NaN/inf loss into :class:`NonFiniteLossError` and a run none of whose checkpoints loads into
:class:`NoLoadableCheckpointError`, else logs ``backbone.pt`` and the MLflow model ``backbone`` (registered as
``tracking.register_model`` if set) and marks the run FINISHED. However it ends, the MLflow run is left FINISHED,
FAILED or KILLED, never RUNNING.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mocolab.config import Config
from mocolab.runtime import RunInterrupted, ensure_ray, fit, sigint_held, torch_trainer
from mocolab.tracking.artifacts import log_backbone_model, log_file
from mocolab.tracking.names import NO_LOADABLE_CHECKPOINT_TAG
from mocolab.tracking.runs import end_run
from mocolab.tracking.store import client_for
from mocolab.tracking.system import compute_recorded
from mocolab.train.checkpoint import BACKBONE_FILE
from mocolab.train.nonfinite import raise_if_nonfinite
from mocolab.train.pretrain import STREAM_IMAGES_KEY, loop_config, train_loop
from mocolab.train.resume import NoLoadableCheckpointError


def build_trainer(cfg: Config, run_id: str, callbacks: Sequence[Any] = ()):
    """The TorchTrainer of a pretraining run logging to MLflow run ``run_id``; with ``data.reader=stream`` it is
    given the Ray Data dataset ``train`` (:mod:`mocolab.data.stream`) and the loop its number of images."""
    config, datasets = loop_config(cfg, run_id), None
    if cfg.data.reader == "stream":
        from mocolab.data.sources import image_source
        from mocolab.data.stream import pretrain_dataset

        files = image_source(cfg.data, "train")  # image files: the config refuses stream for in-memory data
        config[STREAM_IMAGES_KEY] = len(files)
        datasets = {"train": pretrain_dataset(files, cfg.data, cfg.train.seed, cfg.scaling.num_workers)}
    return torch_trainer(
        train_loop,
        config,
        cfg,
        run_name=cfg.tracking.run_name,
        num_workers=cfg.scaling.num_workers,
        max_failures=cfg.train.max_failures,
        keep_checkpoints=cfg.train.keep_checkpoints,
        callbacks=callbacks,
        datasets=datasets,
    )


def finish_pretrain_run(cfg: Config, run_id: str, result) -> None:
    """After ``fit``: stop on a non-finite loss or on a run none of whose checkpoints loads, else log
    ``backbone.pt`` and the model ``backbone``, and mark the run FINISHED."""
    uri = cfg.tracking.tracking_uri
    unloadable = client_for(uri).get_run(run_id).data.tags.get(NO_LOADABLE_CHECKPOINT_TAG)
    if unloadable:
        end_run(uri, run_id, status="FAILED")
        raise NoLoadableCheckpointError(f"run '{cfg.tracking.run_name}': {unloadable}")
    kept = result.checkpoint.path if result.checkpoint is not None else "none (no epoch completed)"
    raise_if_nonfinite(
        uri,
        run_id,
        f"run '{cfg.tracking.run_name}'",
        f"Last good checkpoint: {kept}. Lower train.lr, add train.warmup_epochs or check the data, then start a "
        "new run.",
    )
    if result.checkpoint is None:
        raise RuntimeError(f"run '{cfg.tracking.run_name}' ended without a checkpoint; nothing to export")
    with result.checkpoint.as_directory() as directory:
        backbone = Path(directory) / BACKBONE_FILE
        if not backbone.is_file():
            raise RuntimeError(f"the final checkpoint {result.checkpoint.path} has no {BACKBONE_FILE}")
        log_file(uri, run_id, backbone)
        log_backbone_model(
            uri,
            run_id,
            backbone_module(cfg, backbone),
            cfg.data.image_size,
            step=cfg.train.epochs,
            register_as=cfg.tracking.register_model,
        )
    end_run(uri, run_id, status="FINISHED")


def backbone_module(cfg: Config, weights: Path):
    """The backbone of ``model.*`` (plain BatchNorm, eval mode, on the CPU) holding the weights of ``weights``
    (a ``backbone.pt``): what the logged MLflow model ``backbone`` is."""
    import torch

    from mocolab.moco.backbones import make_backbone, timm_options

    backbone, _ = make_backbone(
        cfg.model.arch, cfg.model.cifar_stem, timm_options=timm_options(cfg.model, cfg.data.image_size)
    )
    backbone.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return backbone.eval()


def fit_pretrain(cfg: Config, run_id: str, callbacks: Sequence[Any] = ()) -> None:
    """Pretrain on Ray (started here if needed) into MLflow run ``run_id`` and finish the run (see
    :func:`finish_pretrain_run`).

    Ctrl-C or SIGTERM at any point leaves the run KILLED and raises RunInterrupted naming it (to resume); any
    other failure leaves it FAILED. The final status is written with Ctrl-C held. Either way the fit's compute is
    added to the run's ``worker_seconds`` / ``device_hours`` (/ ``cost``)."""
    uri, name = cfg.tracking.tracking_uri, cfg.tracking.run_name
    try:
        ensure_ray()
        with compute_recorded(cfg, run_id, cfg.scaling.num_workers):
            result = fit(build_trainer(cfg, run_id, callbacks), cfg, cfg.scaling.num_workers)
        finish_pretrain_run(cfg, run_id, result)
    except (KeyboardInterrupt, SystemExit):
        with sigint_held():
            end_run(uri, run_id, status="KILLED")
        raise RunInterrupted(f"run '{name}' interrupted; MLflow run {run_id} marked KILLED", run_name=name) from None
    except BaseException:
        with sigint_held():
            end_run(uri, run_id, status="FAILED")
        raise
