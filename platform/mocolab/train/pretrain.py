"""The MoCo pretraining loop run by every Ray Train worker (Ray Train V2 API).

Per epoch, every rank trains on its shard (DistributedSampler, drop_last), the mean loss is all-reduced,
rank 0 evaluates the weighted kNN monitor (train split as the bank, test split as queries: done on rank 0
only so that the other ranks need no extra loaders; they wait at ``ray.train.report``), logs the epoch to
MLflow, prints a progress line and, every ``train.checkpoint_every`` epochs, hands a checkpoint to
``ray.train.report``. A run restarted by Ray (FailureConfig) or relaunched under the same name resumes
from ``ray.train.get_checkpoint()``: model (queue, pointer, both encoders), optimizer, scheduler, epoch,
global step and every rank's RNG state. If that checkpoint cannot be loaded, the run resumes from the newest
other one of the run that loads (``train/resume.py``), and rank 0 records the fallback in the MLflow tag
``mocolab.resume_fallback``; if none loads, rank 0 records why in ``mocolab.no_loadable_checkpoint`` and every
rank returns (retrying cannot help), which the driver turns into :class:`NoLoadableCheckpointError`.

A NaN/inf loss (checked every step on the all-reduced loss, so every rank sees it at the same step) is
not a transient failure: rank 0 records where it happened in the MLflow tag ``mocolab.nonfinite_loss``
and every rank returns without a checkpoint, so Ray does not retry and the last good checkpoint stays
the latest one; the driver turns the tag into :class:`NonFiniteLossError`.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from mocolab import tracking
from mocolab.config import Config, TrainConfig
from mocolab.runtime import seed_everything, start_worker
from mocolab.train.checkpoint import capture_rng_state, restore_rng_state, save_checkpoint
from mocolab.train.resume import NoLoadableCheckpointError, Resumed, load_for_resume

BACKBONE_FILE = "backbone.pt"
INJECT_NAN_KEY = "inject_nan_loss_at_epoch"
"""Fault injection for tests of the NaN path: a ``train_loop_config`` key whose value is the epoch in
which the loss is made NaN. Never set by mocolab itself."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf: the run stopped without retry; its last good checkpoint is kept."""


def lr_factor(step: int, steps_per_epoch: int, train: TrainConfig) -> float:
    """Multiplier of ``train.lr`` at iteration ``step`` (0-based): linear warmup over
    ``train.warmup_epochs``, then cosine to 0 over the remaining epochs, or step decay by
    ``train.lr_decay`` at each of ``train.lr_milestones`` (epochs)."""
    warmup_steps = train.warmup_epochs * steps_per_epoch
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    epoch = step / steps_per_epoch
    if train.schedule == "cosine":
        span = max(train.epochs - train.warmup_epochs, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min((epoch - train.warmup_epochs) / span, 1.0)))
    return train.lr_decay ** sum(int(epoch) >= m for m in train.lr_milestones)


def loop_config(cfg: Config, mlflow_run_id: str) -> dict[str, Any]:
    """The ``train_loop_config`` dict of the TorchTrainer (plain JSON types)."""
    return {"config": cfg.model_dump(mode="json"), "mlflow_run_id": mlflow_run_id}


def progress(line: str) -> None:
    """Print a progress line once: to the process's real stdout, which Ray streams to the driver
    (Ray Train's patched ``print`` would emit it twice when stdout is wrapped)."""
    print(line, file=sys.__stdout__, flush=True)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _gather_rng_states(world_size: int) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (a collective: all ranks call it)."""
    state = capture_rng_state()
    if world_size == 1:
        return [state]
    states: list[Any] = [None] * world_size
    dist.all_gather_object(states, state)
    return states


def _all_reduce_mean(value: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(value)
        value = value / world_size
    return value


class _Tracker:
    """Rank 0's MLflow logging and progress line (other ranks get a silent one)."""

    def __init__(self, cfg: Config, run_id: str, active: bool):
        self.active = active
        self.run_id = run_id
        self.epochs = cfg.train.epochs
        if active:
            self._client = tracking.client_for(cfg.tracking.tracking_uri)

    def nonfinite_loss(self, epoch: int, global_step: int, loss: float) -> None:
        if not self.active:
            return
        where = f"loss {loss} in epoch {epoch} at global step {global_step}"
        self._client.set_tag(self.run_id, tracking.NONFINITE_LOSS_TAG, where)
        progress(f"[mocolab] {where}: stopping without retry")

    def resumed(self, resumed: Resumed) -> None:
        if not self.active:
            return
        note = resumed.fallback_note()
        if note:
            self._client.set_tag(self.run_id, tracking.RESUME_FALLBACK_TAG, note[: tracking.MAX_TAG_CHARS])
            progress(f"[mocolab] {note}")
        progress(f"[mocolab] resumed from epoch {resumed.state['epoch']} (global step {resumed.state['global_step']})")

    def no_loadable_checkpoint(self, message: str) -> None:
        if not self.active:
            return
        self._client.set_tag(self.run_id, tracking.NO_LOADABLE_CHECKPOINT_TAG, message[: tracking.MAX_TAG_CHARS])
        progress(f"[mocolab] {message}")

    def epoch(self, epoch: int, metrics: dict[str, Optional[float]]) -> None:
        if not self.active:
            return
        tracking.log_metrics(self._client, self.run_id, metrics, step=epoch)
        knn = metrics.get(tracking.KNN_TOP1)
        knn_text = f"knn_top1 {knn:5.2f}%" if knn is not None else "knn_top1   -   "
        progress(
            f"[mocolab] epoch {epoch:>4}/{self.epochs}  loss {metrics['loss']:.4f}  {knn_text}  "
            f"lr {metrics[tracking.LR]:.4g}  {metrics[tracking.THROUGHPUT]:.0f} img/s  {metrics[tracking.EPOCH_TIME]:.1f} s"
        )


@dataclass
class _EpochStats:
    loss: float  # mean over the epoch's steps and ranks; NaN/inf if the loss became non-finite
    last_lr: float
    images: int  # over all ranks
    corrupt: int  # on this rank
    global_step: int
    finite: bool = True


def _pretrain_loader(cfg: Config, rank: int, world_size: int) -> tuple[DataLoader, DistributedSampler]:
    """This rank's shard of the two-crop training set (DistributedSampler and loader both drop_last)."""
    from mocolab.data.datasets import build_pretrain_dataset, collate_keep_batch_size, loader_kwargs

    dataset = build_pretrain_dataset(cfg.data)
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.train.seed, drop_last=True
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate_keep_batch_size,  # skipped corrupt images: equal batches on every rank
        **loader_kwargs(cfg.data, cfg.scaling.cpus_per_worker, cfg.scaling.use_gpu),
    )
    return loader, sampler


def _restore(state: dict[str, Any], model, optimizer, scheduler, rank: int, seed: int) -> tuple[int, int]:
    """Load a checkpoint's state into the model (queue and pointer included), optimizer, scheduler and this
    rank's RNG; returns ``(completed epochs, global step)``."""
    _unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if rank < len(state["rng"]):
        restore_rng_state(state["rng"][rank])
    else:  # resumed on more workers than saved the checkpoint
        seed_everything(seed + 1000 * state["epoch"] + rank)
    return state["epoch"], state["global_step"]


def _train_epoch(model, loader, optimizer, scheduler, device, world_size, global_step, autocast, nan) -> _EpochStats:
    """One pass over this rank's shard. Stops at the first step whose all-reduced loss is not finite
    (every rank sees the same value, so all stop together)."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    steps = images = corrupt = 0
    last_lr = optimizer.param_groups[0]["lr"]
    for batch, skipped in loader:
        corrupt += skipped
        im_q, im_k, index = (t.to(device, non_blocking=True) for t in batch)
        with autocast:
            loss = model(im_q, im_k, index).loss
        if nan:
            loss = loss * float("nan")
        step_loss = _all_reduce_mean(loss.detach().float().clone(), world_size)
        if not torch.isfinite(step_loss):
            return _EpochStats(float(step_loss), last_lr, images, corrupt, global_step, finite=False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        last_lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        loss_sum += step_loss
        steps += 1
        images += im_q.shape[0] * world_size
        global_step += 1
    return _EpochStats(float(loss_sum) / max(steps, 1), last_lr, images, corrupt, global_step)


def _write_checkpoint(
    tmp: str, model, optimizer, scheduler, epoch: int, global_step: int, rng, run_id: str,
    config: dict[str, Any], final: bool,
) -> None:
    """Write the checkpoint (plus ``backbone.pt`` after the last epoch) into ``tmp``."""
    save_checkpoint(
        tmp,
        {
            "model": _unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "global_step": global_step,
            "rng": rng,
            "mlflow_run_id": run_id,
            "config": tracking.redact_tree(config),  # checkpoints may sit in shared storage: no credentials
        },
    )
    if final:
        torch.save(_unwrap(model).backbone_state_dict(), Path(tmp) / BACKBONE_FILE)


def init_backbones(model, path: Path) -> None:
    """``model.init_weights``: the query encoder's backbone starts from the weights in ``path`` (any layout
    ``weights_io`` reads; the driver checked that they fit) and the key encoder, if any, as its copy."""
    from mocolab.weights_io.files import load_backbone_weights

    model.encoder_q.backbone.load_state_dict(load_backbone_weights(path, f"model.init_weights={path}").state)
    if hasattr(model, "encoder_k"):
        model.encoder_k.load_state_dict(model.encoder_q.state_dict())


def train_loop(config_dict: dict[str, Any]) -> None:
    """Train MoCo on this worker; ``config_dict`` is :func:`loop_config`'s output."""
    import ray.train
    import ray.train.torch

    from mocolab.moco.model import MoCo
    from mocolab.train.knn import knn_top1

    # the same initial weights on every rank (DDP also broadcasts rank 0's)
    worker = start_worker(config_dict, seed=config_dict["config"]["train"]["seed"])
    cfg, rank, world_size, device = worker.cfg, worker.rank, worker.world_size, worker.device
    run_id, train = config_dict["mlflow_run_id"], cfg.train
    loader, sampler = _pretrain_loader(cfg, rank, world_size)
    steps_per_epoch = len(loader)
    model = MoCo.from_config(cfg, num_train_samples=len(loader.dataset))  # model.channels_last, model.compile
    if cfg.model.init_weights is not None:  # a resumed run overwrites these from its checkpoint below
        init_backbones(model, cfg.model.init_weights)
    # forward_sync_buffers=False: buffers are synced from rank 0 once at wrap time; after that every rank
    # enqueues the same gathered keys, so the queue stays identical without re-sending it (and the BN
    # running stats) at every forward.
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"forward_sync_buffers": False})
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=train.lr,
        momentum=train.sgd_momentum,
        weight_decay=train.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, train))

    tracker = _Tracker(cfg, run_id, active=worker.is_chief)
    start_epoch, global_step = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        try:
            resumed = load_for_resume(checkpoint, rank, world_size, device)
        except NoLoadableCheckpointError as err:
            tracker.no_loadable_checkpoint(str(err))
            return  # every rank returns here: a clean end, which Ray does not retry
        start_epoch, global_step = _restore(resumed.state, model, optimizer, scheduler, rank, train.seed)
        tracker.resumed(resumed)
    else:
        seed_everything(train.seed + rank)  # different augmentations on every rank

    knn_data = knn_loaders(cfg) if worker.is_chief and train.knn_every else None
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=train.amp)
    nan_epoch = config_dict.get(INJECT_NAN_KEY)

    for epoch in range(start_epoch + 1, train.epochs + 1):
        sampler.set_epoch(epoch)
        started = time.perf_counter()
        stats = _train_epoch(
            model, loader, optimizer, scheduler, device, world_size, global_step, autocast, epoch == nan_epoch
        )
        epoch_time = time.perf_counter() - started
        if not stats.finite:
            tracker.nonfinite_loss(epoch, stats.global_step, stats.loss)
            return  # every rank returns here: a clean end, which Ray does not retry
        global_step = stats.global_step
        corrupt = _all_reduce_mean(torch.tensor(float(stats.corrupt), device=device), world_size) * world_size
        last_epoch = epoch == train.epochs
        save_now = epoch % train.checkpoint_every == 0 or last_epoch
        rng_states = _gather_rng_states(world_size) if save_now else None  # before kNN: it draws no RNG
        metrics: dict[str, Optional[float]] = {
            tracking.LOSS: stats.loss,
            tracking.LR: stats.last_lr,
            tracking.EPOCH_TIME: epoch_time,
            tracking.THROUGHPUT: stats.images / epoch_time,
            tracking.CORRUPT_SKIPPED: float(corrupt),
            tracking.KNN_TOP1: None,
        }
        if knn_data is not None and (epoch % train.knn_every == 0 or last_epoch):
            backbone = _unwrap(model).encoder_q.backbone
            metrics[tracking.KNN_TOP1] = knn_top1(backbone, *knn_data, k=train.knn_k, t=train.knn_t, device=device)
        tracker.epoch(epoch, metrics)
        report = {"epoch": epoch, **{k: v for k, v in metrics.items() if v is not None}}
        if save_now and worker.is_chief:
            with tempfile.TemporaryDirectory(prefix="mocolab-ckpt-") as tmp:
                _write_checkpoint(
                    tmp, model, optimizer, scheduler, epoch, global_step, rng_states, run_id,
                    config_dict["config"], final=last_epoch,
                )
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(report)


def knn_loaders(cfg: Config) -> tuple[DataLoader, DataLoader]:
    """Loaders of the train split (the kNN bank) and the test split, with the evaluation transform.

    They get their own generator so that the monitor leaves the training RNG streams untouched
    (a resumed run then replays exactly what an uninterrupted one does)."""
    from mocolab.data.augment import eval_transform
    from mocolab.data.datasets import build_labeled_dataset

    transform = eval_transform(cfg.data.image_size)
    return tuple(
        DataLoader(
            build_labeled_dataset(cfg.data, split, transform),
            batch_size=max(cfg.train.batch_size, 256),
            shuffle=False,
            collate_fn=_collate_labeled,
            generator=torch.Generator().manual_seed(cfg.train.seed),
        )
        for split in (cfg.data.train_split, cfg.data.test_split)
    )


def _collate_labeled(batch: list) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` without the skipped corrupt images (None if all were skipped)."""
    from mocolab.data.datasets import collate_skip_corrupt

    return collate_skip_corrupt(batch)[0]
