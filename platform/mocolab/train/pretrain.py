"""The MoCo pretraining loop run by every Ray Train worker (Ray Train V2 API).

Per epoch, every rank trains on its shard (``data.reader=loader``: DistributedSampler, drop_last; ``stream``: its
equal share of the Ray Data stream, ``get_dataset_shard("train")``, as many steps on every rank) with
:class:`~mocolab.train.step.TrainStep` (no host read inside the step), rank 0 shows a progress bar over the epoch's
steps (:mod:`mocolab.console`), the
mean loss is all-reduced once at the end, every rank embeds its shard of the kNN monitor's labeled data
(:attr:`Config.knn_data`; ``train/knn.py``: the bank all-gathered, the correct counts summed), rank 0 logs the
epoch to MLflow, prints the epoch line and, every ``train.checkpoint_every`` epochs, hands a checkpoint to
``ray.train.report``. A run restarted by Ray (FailureConfig) or relaunched under the same name resumes from
``ray.train.get_checkpoint()``: model (queue, pointer, both encoders), optimizer, fp16 loss scaler, scheduler,
epoch, global step and every rank's RNG state. If that checkpoint cannot be loaded, the run resumes from the
newest other one of the run that loads (``train/resume.py``), and rank 0 records the fallback in the MLflow tag
``mocolab.resume_fallback``; if none loads, rank 0 records why in ``mocolab.no_loadable_checkpoint`` and every
rank returns (retrying cannot help), which the driver turns into :class:`NoLoadableCheckpointError`.

A NaN/inf loss is not a transient failure. The losses stay on the device; every ``train.check_finite_every``
steps and at the end of every epoch all ranks agree (one all-reduce) on the first step whose loss was not finite.
If there is one, rank 0 records where it happened in the MLflow tag ``mocolab.nonfinite_loss`` and every rank
returns without a checkpoint, so Ray does not retry and the last good checkpoint stays the latest one; the
driver turns the tag into :class:`~mocolab.train.nonfinite.NonFiniteLossError` (``train/nonfinite.py``).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from mocolab import tracking
from mocolab.config import Config
from mocolab.console import StepProgress, console
from mocolab.data.normalize import normalize_views
from mocolab.runtime import seed_everything, start_worker
from mocolab.train.checkpoint import (
    gather_rng_states,
    init_backbones,
    restore_training_state,
    unwrap,
    write_training_checkpoint,
)
from mocolab.train.knn import knn_loaders
from mocolab.train.nonfinite import record_nonfinite
from mocolab.train.resume import NoLoadableCheckpointError, Resumed, load_for_resume
from mocolab.train.schedule import lr_factor, momentum_schedule
from mocolab.train.step import LossWatch, TrainStep, make_optimizer

STREAM_IMAGES_KEY = "stream_images"
"""``data.reader=stream``: the ``train_loop_config`` key holding the number of training images the driver listed."""
INJECT_NAN_KEY = "inject_nan_loss_at_epoch"
"""Fault injection for tests of the NaN path: a ``train_loop_config`` key whose value is the epoch in which the
query crops (hence the loss) are made NaN. Never set by mocolab itself."""


def loop_config(cfg: Config, mlflow_run_id: str) -> dict[str, Any]:
    """The ``train_loop_config`` dict of the TorchTrainer (plain JSON types)."""
    return {"config": cfg.model_dump(mode="json"), "mlflow_run_id": mlflow_run_id}


def _all_reduce_mean(value: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(value)
        value = value / world_size
    return value


class _Tracker:
    """Rank 0's MLflow logging and progress line (other ranks get a silent one).

    Epoch metrics are written in MLflow's background thread, so that neither rank 0 nor the ranks waiting for it
    at ``ray.train.report`` sit out a round trip to the tracking server every epoch; :meth:`flush` waits for them
    (before the loop returns)."""

    def __init__(self, cfg: Config, run_id: str, active: bool):
        self.active = active
        self.run_id = run_id
        self.tracking_uri = cfg.tracking.tracking_uri
        self.epochs = cfg.train.epochs
        self._pending: list[Any] = []
        if active:
            self._client = tracking.client_for(cfg.tracking.tracking_uri)

    def flush(self) -> None:
        """Wait until every epoch's metrics are in MLflow (raises what a failed write raised)."""
        while self._pending:
            self._pending.pop(0).wait()

    def nonfinite_loss(self, epoch: int, global_step: int) -> None:
        if not self.active:
            return
        record_nonfinite(self.tracking_uri, self.run_id, f"loss in epoch {epoch} at global step {global_step}")

    def resumed(self, resumed: Resumed) -> None:
        if not self.active:
            return
        note = resumed.fallback_note()
        if note:
            self._client.set_tag(self.run_id, tracking.RESUME_FALLBACK_TAG, note[: tracking.MAX_TAG_CHARS])
            console(f"[mocolab] {note}")
        console(f"[mocolab] resumed from epoch {resumed.state['epoch']} (global step {resumed.state['global_step']})")

    def no_loadable_checkpoint(self, message: str) -> None:
        if not self.active:
            return
        self._client.set_tag(self.run_id, tracking.NO_LOADABLE_CHECKPOINT_TAG, message[: tracking.MAX_TAG_CHARS])
        console(f"[mocolab] {message}")

    def epoch(self, epoch: int, metrics: dict[str, float | None]) -> None:
        if not self.active:
            return
        self._pending.append(tracking.log_metrics(self._client, self.run_id, metrics, step=epoch, wait=False))
        knn = metrics.get(tracking.KNN_TOP1)
        knn_text = f"knn_top1 {knn:5.2f}%" if knn is not None else "knn_top1   -   "
        probe = metrics.get(tracking.LINCLS_FAST_METRICS[0])
        if probe is not None:
            knn_text += f"  linear probe {probe:5.2f}%"
        console(
            f"[mocolab] epoch {epoch:>4}/{self.epochs}  loss {metrics['loss']:.4f}  {knn_text}  "
            f"lr {metrics[tracking.LR]:.4g}  {metrics[tracking.THROUGHPUT]:.0f} img/s  "
            f"{metrics[tracking.EPOCH_TIME]:.1f} s"
        )


@dataclass
class _EpochStats:
    loss: float  # mean over the epoch's steps and ranks
    last_lr: float
    images: int  # over all ranks
    corrupt: int  # on this rank
    global_step: int
    nonfinite_step: int | None = None  # the global step whose loss first was NaN/inf, if one was


def pretrain_loader(cfg: Config, rank: int, world_size: int) -> tuple[DataLoader, DistributedSampler]:
    """This rank's shard of the two-crop training set (DistributedSampler and loader both drop_last); with
    ``data.pipeline=device`` of the images' bytes (:mod:`mocolab.data.encoded`), decoded on the device later."""
    from mocolab.data.datasets import build_pretrain_dataset, collate_keep_batch_size, loader_kwargs
    from mocolab.data.sources import image_source

    if cfg.data.pipeline == "device":
        from mocolab.data.encoded import EncodedDataset, collate_encoded

        dataset, collate = EncodedDataset(image_source(cfg.data, "train"), cfg.data.on_corrupt), collate_encoded
    else:
        dataset, collate = build_pretrain_dataset(cfg.data), collate_keep_batch_size
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.train.seed, drop_last=True
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate,  # skipped corrupt images: equal batches on every rank
        **loader_kwargs(cfg.data, cfg.scaling.cpus_per_worker, cfg.scaling.use_gpu),
    )
    return loader, sampler


def _training_batches(cfg: Config, config_dict: dict[str, Any], rank: int, world_size: int):
    """``(batches, sampler or None, steps per epoch, training images)`` of ``data.reader``: the DataLoader of this
    rank's shard, or this worker's equal share of the Ray Data stream (:mod:`mocolab.data.stream`), iterated
    afresh every epoch."""
    if cfg.data.reader == "loader":
        loader, sampler = pretrain_loader(cfg, rank, world_size)
        return loader, sampler, len(loader), len(loader.dataset)
    import ray.train

    from mocolab.data.stream import ShardBatches, steps_per_epoch

    num_images, batch_size = config_dict[STREAM_IMAGES_KEY], cfg.train.batch_size
    batches = ShardBatches(
        ray.train.get_dataset_shard("train"), batch_size, cfg.train.seed + rank, encoded=cfg.data.pipeline == "device"
    )
    return batches, None, steps_per_epoch(num_images, world_size, batch_size), num_images


def batch_views(cfg: Config, device: torch.device) -> Callable[[Any], tuple[Any, Any, Any, int]]:
    """What the loop does to a batch of its reader to get ``(view_q, view_k, index, skipped)`` on ``device``:
    ``data.pipeline=cpu`` moves the CPU's views there; ``device`` decodes and two-crops the bytes there
    (:class:`mocolab.data.encoded.DeviceViews`)."""
    if cfg.data.pipeline == "device":
        from mocolab.data.encoded import DeviceViews

        return DeviceViews(cfg.data.augment, cfg.data.image_size, cfg.data.on_corrupt, device, cfg.train.batch_size)

    def move(item):
        (im_q, im_k, index), skipped = item
        im_q, im_k, index = (t.to(device, non_blocking=True) for t in (im_q, im_k, index))
        return normalize_views(im_q), normalize_views(im_k), index, skipped  # uint8 views become floats here

    return move


def run_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """``train.optimizer`` over ``model``'s trainable parameters at the run's peak learning rate (``cfg.base_lr``):
    the worker loop's and the benchmark launcher's, so both train the same way."""
    train = cfg.train
    params = (p for p in model.parameters() if p.requires_grad)
    return make_optimizer(params, cfg.base_lr, train.sgd_momentum, train.weight_decay, train.amp, train.optimizer)


def broadcast_buffers(module: torch.nn.Module, world_size: int) -> None:
    """Give every rank rank 0's buffers of ``module`` (BN running statistics: with shuffle-BN each rank's follow its
    own batches, which training never reads, but evaluation mode does)."""
    if world_size > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def _train_epoch(
    step: TrainStep,
    loader,
    views: Callable,
    scheduler,
    device,
    world_size: int,
    global_step: int,
    check_every: int,
    poison: bool,
    bar: StepProgress,
    momentum_at: Callable[[int], float] | None = None,
) -> _EpochStats:
    """One pass over this rank's shard, shown on ``bar``; ``views`` (:func:`batch_views`) makes each batch's views
    on the device. Every ``check_every`` steps and at the end, all ranks agree on the first non-finite loss (a
    collective at the same step everywhere: every rank has as many batches); the epoch stops at the first check that
    finds one. ``poison``: fault injection, NaN query crops. ``momentum_at``: the key encoder's momentum of each
    global step (None: constant)."""
    step.model.train()
    watch = LossWatch(device)
    images = corrupt = 0
    last_lr = step.optimizer.param_groups[0]["lr"]
    for batch in loader:
        im_q, im_k, index, skipped = views(batch)
        corrupt += skipped
        if poison:
            im_q = im_q * float("nan")
        last_lr = step.optimizer.param_groups[0]["lr"]
        if momentum_at is not None:
            unwrap(step.model).momentum = momentum_at(global_step)
        loss = step(im_q, im_k, index)
        watch.add(loss, global_step)
        scheduler.step()
        images += im_q.shape[0] * world_size
        global_step += 1
        bar.step(im_q.shape[0] * world_size, loss, last_lr)
        if watch.steps % check_every == 0:
            bad = watch.first_nonfinite_step()
            if bad is not None:
                return _EpochStats(math.nan, last_lr, images, corrupt, global_step, nonfinite_step=bad)
    bad = watch.first_nonfinite_step()
    return _EpochStats(watch.mean(), last_lr, images, corrupt, global_step, nonfinite_step=bad)


def train_loop(config_dict: dict[str, Any]) -> None:
    """Train MoCo on this worker; ``config_dict`` is :func:`loop_config`'s output."""
    import ray.train
    import ray.train.torch

    from mocolab.evaluate.probe import linear_probe_top1
    from mocolab.moco.model import MoCo
    from mocolab.train.knn import knn_top1

    # the same initial weights on every rank (DDP also broadcasts rank 0's)
    worker = start_worker(config_dict, seed=config_dict["config"]["train"]["seed"])
    cfg, rank, world_size, device = worker.cfg, worker.rank, worker.world_size, worker.device
    run_id, train = config_dict["mlflow_run_id"], cfg.train
    loader, sampler, steps_per_epoch, num_images = _training_batches(cfg, config_dict, rank, world_size)
    model = MoCo.from_config(cfg, num_train_samples=num_images)  # model.channels_last, model.compile
    if cfg.model.init_weights is not None:  # a resumed run overwrites these from its checkpoint below
        init_backbones(model, cfg.model.init_weights)
    # forward_sync_buffers=False: buffers are synced from rank 0 once at wrap time; after that every rank
    # enqueues the same gathered keys, so the queue stays identical without re-sending it (and the BN
    # running stats) at every forward.
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"forward_sync_buffers": False})
    optimizer = run_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, train))
    step = TrainStep(model, optimizer, train.amp, device.type)
    momentum_at = momentum_schedule(cfg, steps_per_epoch)
    views = batch_views(cfg, device)

    tracker = _Tracker(cfg, run_id, active=worker.is_chief)
    start_epoch, global_step = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        try:
            resumed = load_for_resume(checkpoint, rank, world_size, device)
        except NoLoadableCheckpointError as err:
            tracker.no_loadable_checkpoint(str(err))
            return  # every rank returns here: a clean end, which Ray does not retry
        start_epoch, global_step = restore_training_state(resumed.state, step, scheduler, rank, train.seed)
        tracker.resumed(resumed)
    else:
        seed_everything(train.seed + rank)  # different augmentations on every rank

    monitor = _start_system_metrics(cfg, run_id)
    knn_data = knn_loaders(cfg, rank, world_size) if train.knn_every and cfg.knn_data is not None else None
    nan_epoch = config_dict.get(INJECT_NAN_KEY)

    for epoch in range(start_epoch + 1, train.epochs + 1):
        if sampler is not None:
            sampler.set_epoch(epoch)
        started = time.perf_counter()
        with StepProgress(f"epoch {epoch}/{train.epochs}", steps_per_epoch, active=worker.is_chief) as bar:
            stats = _train_epoch(
                step,
                loader,
                views,
                scheduler,
                device,
                world_size,
                global_step,
                train.check_finite_every,
                epoch == nan_epoch,
                bar,
                momentum_at,
            )
        epoch_time = time.perf_counter() - started
        if stats.nonfinite_step is not None:
            tracker.nonfinite_loss(epoch, stats.nonfinite_step)
            tracker.flush()
            tracking.stop_system_metrics(monitor)
            return  # every rank returns here: a clean end, which Ray does not retry
        global_step = stats.global_step
        corrupt = _all_reduce_mean(torch.tensor(float(stats.corrupt), device=device), world_size) * world_size
        last_epoch = epoch == train.epochs
        save_now = epoch % train.checkpoint_every == 0 or last_epoch
        rng_states = gather_rng_states(world_size) if save_now else None  # before kNN: it draws no RNG
        metrics: dict[str, float | None] = {
            tracking.LOSS: stats.loss,
            tracking.LR: stats.last_lr,
            tracking.EPOCH_TIME: epoch_time,
            tracking.THROUGHPUT: stats.images / epoch_time,
            tracking.CORRUPT_SKIPPED: float(corrupt),
            tracking.KNN_TOP1: None,
        }
        if knn_data is not None and (epoch % train.knn_every == 0 or last_epoch):
            backbone = unwrap(model).encoder_q.backbone
            broadcast_buffers(backbone, world_size)  # every rank embeds with rank 0's BN statistics
            metrics[tracking.KNN_TOP1] = knn_top1(backbone, *knn_data, k=train.knn_k, t=train.knn_t, device=device)
            if last_epoch and train.linear_probe:
                probe_started = time.perf_counter()
                probe = linear_probe_top1(backbone, cfg.model.arch, *knn_data, device, seed=train.seed)
                metrics[tracking.LINCLS_FAST_METRICS[0]] = probe
                metrics[tracking.LINEAR_PROBE_TIME] = time.perf_counter() - probe_started
        tracker.epoch(epoch, metrics)
        report = {"epoch": epoch, **{k: v for k, v in metrics.items() if v is not None}}
        if save_now and worker.is_chief:
            with tempfile.TemporaryDirectory(prefix="mocolab-ckpt-") as tmp:
                write_training_checkpoint(
                    tmp,
                    step,
                    scheduler,
                    epoch,
                    global_step,
                    rng_states,
                    run_id,
                    config_dict["config"],
                    final=last_epoch,
                )
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(report)
    tracker.flush()
    tracking.stop_system_metrics(monitor)


def _start_system_metrics(cfg: Config, run_id: str):
    """The system-metrics monitor of this worker's node, run by its local rank 0 (None on the other workers).
    Metric names carry the node (``system/node_1/...``) only when the run spans several nodes."""
    import ray.train

    context = ray.train.get_context()
    if context.get_local_rank() != 0:
        return None
    several_nodes = context.get_local_world_size() < context.get_world_size()
    node_id = f"node_{context.get_node_rank()}" if several_nodes else None
    return tracking.start_system_metrics(
        cfg.tracking.tracking_uri, run_id, cfg.tracking.system_metrics_interval_s, node_id
    )
