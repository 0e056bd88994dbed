"""The baseline a user would otherwise run: the official MoCo launcher's way, against ``mocolab pretrain``.

``launcher_run`` starts ``scaling.num_workers`` processes with ``torch.multiprocessing.spawn`` and
``torch.distributed`` (gloo on CPU, nccl on GPU, process ``i`` on GPU ``i``), no Ray and no MLflow, and trains the
config the way ``main_moco.py`` does: the same model (``MoCo.from_config``) wrapped in DDP as mocolab wraps it, the
same data pipeline, sampler, batch, optimizer, schedule and step (``TrainStep``), a loss meter that reads every
step's loss (``loss.item()``, as the official ``AverageMeter``), and rank 0 saving a plain ``torch.save`` checkpoint
at the config's ``train.checkpoint_every``. Its epochs are timed at the point where mocolab's are (after the
training loop, before the checkpoint), so both periods hold the same work plus whatever each adds between epochs.

``compare_with_launcher`` alternates whole runs (mocolab, launcher; then launcher, mocolab; ...) and returns every
round's pair, so each ratio comes with its spread over rounds. After its epochs, every launcher round also times
one evaluation of the kNN monitor on all its ranks (``train/knn.py``, as the training loop runs it).
"""

from __future__ import annotations

import json
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mocolab.bench.pretrain_run import EpochTimes, PretrainTimes, run_timed_pretrain
from mocolab.bench.spread import Spread

RESULT_FILE = "launcher.json"


@dataclass(frozen=True)
class LauncherTimes:
    """A launcher run's epochs after the first, and the seconds of one kNN monitor evaluation."""

    epochs: EpochTimes
    knn_s: float


@dataclass(frozen=True)
class LauncherComparison:
    """Every round's mocolab run and launcher run, in round order."""

    mocolab: list[PretrainTimes]
    launcher: list[LauncherTimes]

    def epoch_ratio(self) -> Spread:
        """mocolab's whole-epoch images/s over the launcher's, per round."""
        return Spread.of([m.epochs.img_s / b.epochs.img_s for m, b in zip(self.mocolab, self.launcher)])

    def loop_ratio(self) -> Spread:
        """The same for the training loops alone (what happens between epochs left out)."""
        return Spread.of([m.epochs.loop_img_s / b.epochs.loop_img_s for m, b in zip(self.mocolab, self.launcher)])

    def knn_vs_epoch(self) -> Spread:
        """One kNN evaluation's seconds over one launcher epoch's, per round: what a monitor every epoch adds."""
        return Spread.of([b.knn_s / (sum(b.epochs.period_s) / len(b.epochs.period_s)) for b in self.launcher])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher_worker(rank: int, config: dict[str, Any], epochs: int, port: int, out_dir: str) -> None:
    """One process of :func:`launcher_run`; rank 0 writes the timings to ``out_dir/RESULT_FILE``."""
    from torch.nn.parallel import DistributedDataParallel
    from torch.optim.lr_scheduler import LambdaLR

    from mocolab.config import Config
    from mocolab.moco.model import MoCo
    from mocolab.runtime import seed_everything
    from mocolab.train.knn import knn_loaders, knn_top1
    from mocolab.train.pretrain import batch_views, broadcast_buffers, pretrain_loader, run_optimizer
    from mocolab.train.schedule import lr_factor
    from mocolab.train.step import TrainStep

    cfg = Config.model_validate(config)
    train, world = cfg.train, cfg.scaling.num_workers
    device = torch.device(f"cuda:{rank}" if cfg.scaling.use_gpu else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        seed_everything(train.seed)
        loader, sampler = pretrain_loader(cfg, rank, world)
        model = MoCo.from_config(cfg, num_train_samples=len(loader.dataset)).to(device)
        ddp = DistributedDataParallel(
            model, device_ids=[rank] if device.type == "cuda" else None, forward_sync_buffers=False
        )
        optimizer = run_optimizer(ddp, cfg)
        scheduler = LambdaLR(optimizer, lambda s: lr_factor(s, len(loader), train))
        step = TrainStep(ddp, optimizer, train.amp, device.type)
        seed_everything(train.seed + rank)
        views = batch_views(cfg, device)
        images, loop_s, ends = [], [], [time.perf_counter()]
        with tempfile.TemporaryDirectory(prefix="mocolab-launcher-") as checkpoints:
            for epoch in range(1, epochs + 1):
                sampler.set_epoch(epoch)
                ddp.train()
                started = time.perf_counter()
                loss_sum, seen = 0.0, 0
                for batch in loader:
                    im_q, im_k, index, _ = views(batch)
                    loss_sum += step(im_q, im_k, index).item() * im_q.shape[0]  # the official AverageMeter
                    seen += im_q.shape[0]
                    scheduler.step()
                ends.append(time.perf_counter())
                loop_s.append(ends[-1] - started)
                images.append(seen * world)
                if rank == 0 and (epoch % train.checkpoint_every == 0 or epoch == epochs):
                    torch.save(
                        {"epoch": epoch, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict()},
                        Path(checkpoints) / f"checkpoint_{epoch:04d}.pth.tar",
                    )
        bank, queries = knn_loaders(cfg, rank, world)
        backbone = model.encoder_q.backbone
        dist.barrier()
        started = time.perf_counter()
        broadcast_buffers(backbone, world)
        knn_top1(backbone, bank, queries, k=train.knn_k, t=train.knn_t, device=device)
        knn_s = time.perf_counter() - started
        if rank == 0:
            periods = [b - a for a, b in zip(ends, ends[1:])]
            record = {"images": images[1:], "loop_s": loop_s[1:], "period_s": periods[1:], "knn_s": knn_s}
            (Path(out_dir) / RESULT_FILE).write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


def launcher_run(cfg, epochs: int, workdir: Path) -> LauncherTimes:
    """Train ``cfg`` for ``epochs`` epochs the official launcher's way (see the module docstring)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / RESULT_FILE).unlink(missing_ok=True)
    config = cfg.model_dump(mode="json")
    mp.spawn(
        _launcher_worker, args=(config, epochs, _free_port(), str(workdir)), nprocs=cfg.scaling.num_workers, join=True
    )
    record = json.loads((workdir / RESULT_FILE).read_text())
    return LauncherTimes(EpochTimes(record["images"], record["loop_s"], record["period_s"]), record["knn_s"])


def compare_with_launcher(cfg, epochs: int, rounds: int, workdir: Path) -> LauncherComparison:
    """``rounds`` alternating rounds of a timed ``mocolab pretrain`` run and a launcher run of ``epochs`` epochs
    each: mocolab first in even rounds, the launcher first in odd ones."""
    mocolab: list[PretrainTimes] = []
    launcher: list[LauncherTimes] = []
    for r in range(rounds):
        for who in ("mocolab", "launcher") if r % 2 == 0 else ("launcher", "mocolab"):
            if who == "mocolab":
                mocolab.append(run_timed_pretrain(cfg, workdir / f"mocolab-{r}", epochs=epochs))
            else:
                launcher.append(launcher_run(cfg, epochs, workdir / f"launcher-{r}"))
    return LauncherComparison(mocolab, launcher)
