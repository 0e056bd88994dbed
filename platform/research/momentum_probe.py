"""Why does MoCo fail at momentum 0.9 on the made digits task? A single-process probe (no Ray, no MLflow).

Runs mocolab's own MoCo step (``mocolab.moco.model.MoCo``, the same data, schedule and kNN monitor as a Ray
Train worker) on one CPU thread and prints, per epoch, the training loss, the kNN top-1 and diagnostics of the
dictionary:

- ``pos`` / ``neg`` / ``negmax``: mean cosine of a query with its positive key, with the queue's keys, and its
  largest cosine with a queue key (the positive must beat all of them by a margin ~ temperature);
- ``qk``: mean cosine between the query encoder's and the key encoder's embedding of the same crop (how far the
  key encoder lags behind);
- ``stale_new`` / ``stale_old``: mean cosine between a key stored in the queue and the same crop encoded again
  now by the key encoder (the newest and the oldest quarter of the queue): how stale the dictionary is;
- ``spread``: mean pairwise cosine of the queue's keys (1 = every key alike: collapse);
- ``shift`` / ``inst``: the positive's advantage over the mean negative, ``q.(k+ - mean queue key)``, split into
  ``q.(mean batch key - mean queue key)`` (the whole batch's keys moved away from the queue's: a lead that needs
  no instance discrimination) and ``q.(k+ - mean batch key)`` (the instance term);
- ``drift``: mean cosine between a fixed probe batch's keys at the start and at the end of the epoch (how fast
  the key encoder's embedding moves in an epoch).

``--switch EPOCH:M`` sets the momentum to ``M`` after epoch ``EPOCH`` (e.g. start at 0.99, continue at 0.9: is
the failure an early-training event?). With ``--fresh-queue`` every queue key is encoded again by the current key
encoder after each step: a
dictionary with no stale keys (an intervention, ~K/B times the key encoder's work), to tell staleness apart from
the key encoder's speed as such.

    PYTHONPATH=platform python platform/research/momentum_probe.py --set moco.momentum=0.9 --epochs 12
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch
from torch.utils.data import DataLoader

from mocolab.config import load_config
from mocolab.data.datasets import build_pretrain_dataset, collate_keep_batch_size
from mocolab.moco.model import MoCo
from mocolab.runtime import seed_everything
from mocolab.train.knn import knn_loaders, knn_top1
from mocolab.train.schedule import lr_factor

SWEEP_BASE = [  # the momentum_cpu sweep's trial: one worker, the quickstart's global batch, split-BN
    "scaling.num_workers=1",
    "train.batch_size=64",
    "model.bn=split",
    "model.bn_splits=2",
]


class KeyCrops:
    """The key crops of the queue's rows, in the queue's order, with the step each was enqueued at."""

    def __init__(self, size: int, shape: tuple[int, ...]):
        self.crops = torch.zeros(size, *shape)
        self.step = torch.full((size,), -1, dtype=torch.long)

    def add(self, ptr: int, crops: torch.Tensor, step: int) -> None:
        self.crops[ptr : ptr + crops.shape[0]] = crops
        self.step[ptr : ptr + crops.shape[0]] = step


@torch.no_grad()
def reencode_queue(model: MoCo, crops: KeyCrops, batch: int) -> None:
    """Replace every filled queue row by its crop's key from the current key encoder (same batches as enqueued)."""
    for i in range(0, len(crops.step), batch):
        if crops.step[i] >= 0:
            model.dictionary.queue[i : i + batch] = model._key_pass(model.encoder_k, crops.crops[i : i + batch])


@torch.no_grad()
def staleness(model: MoCo, crops: KeyCrops, batch: int, now: int) -> tuple[float, float]:
    """Mean cosine between stored queue keys and the same crops re-encoded now (newest, oldest quarter)."""
    encoder = copy.deepcopy(model.encoder_k).train()  # batch statistics, as when the keys were made
    fresh = torch.cat([model._key_pass(encoder, crops.crops[i : i + batch]) for i in range(0, len(crops.step), batch)])
    cos = (fresh * model.dictionary.queue).sum(dim=1)
    age = now - crops.step
    order = torch.argsort(age)
    quarter = max(1, len(order) // 4)
    return float(cos[order[:quarter]].mean()), float(cos[order[-quarter:]].mean())


def run(
    cfg, epochs: int, log_every_step: bool, fresh_queue: bool = False, switch: tuple[int, float] | None = None
) -> list[dict]:
    torch.set_num_threads(1)
    seed_everything(cfg.train.seed)
    dataset = build_pretrain_dataset(cfg.data)
    loader = DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate_keep_batch_size,
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
    model = MoCo.from_config(cfg, num_train_samples=len(dataset))
    opt = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.train.lr,
        momentum=cfg.train.sgd_momentum,
        weight_decay=cfg.train.weight_decay,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, len(loader), cfg.train))
    knn_data = knn_loaders(cfg)
    queue_mode = cfg.moco.mechanism == "moco"
    crops = KeyCrops(cfg.moco.queue_size, tuple(dataset[0][1].shape)) if queue_mode else None
    probe = next(iter(loader))[0][1]
    captured: dict[str, torch.Tensor] = {}
    model.encoder_q.register_forward_hook(lambda m, i, o: captured.__setitem__("q", o.detach()))
    if queue_mode:  # keys of the step (in shuffled order: only their mean is used)
        model.encoder_k.register_forward_hook(lambda m, i, o: captured.__setitem__("k_shuffled", o.detach()))
    step, rows = 0, []
    init_knn = knn_top1(model.encoder_q.backbone, *knn_data, k=cfg.train.knn_k, t=cfg.train.knn_t)
    print(json.dumps({"epoch": 0, "knn_top1": round(init_knn, 4)}), flush=True)  # the random-init level
    for epoch in range(1, epochs + 1):
        if switch is not None and epoch == switch[0] + 1:
            model.momentum = switch[1]
        started = time.process_time()
        model.train()
        with torch.no_grad(), torch.random.fork_rng():  # diagnostics leave the training RNG alone
            probe_before = model._key_pass(copy.deepcopy(model.encoder_k if queue_mode else model.encoder_q), probe)
        sums = {"loss": 0.0, "pos": 0.0, "neg": 0.0, "negmax": 0.0, "shift": 0.0, "inst": 0.0}
        for (im_q, im_k, index), _ in loader:
            ptr = model.dictionary._ptr if queue_mode else 0
            queue_mean = model.dictionary.queue.mean(dim=0) if queue_mode else None
            out = model(im_q, im_k, index)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                t = model.temperature
                pos = out.logits[:, 0] * t
                neg = out.logits[:, 1:] * t
                sums["loss"] += float(out.loss)
                sums["pos"] += float(pos.mean())
                sums["neg"] += float(neg.mean())
                sums["negmax"] += float(neg.max(dim=1).values.mean())
                if queue_mode:
                    q, batch_mean = captured["q"], captured["k_shuffled"].mean(dim=0)
                    sums["shift"] += float((q @ (batch_mean - queue_mean)).mean())
                    sums["inst"] += float((pos - q @ batch_mean).mean())
                if queue_mode:
                    crops.add(ptr, im_k, step)
                    if fresh_queue:
                        reencode_queue(model, crops, cfg.global_batch)
            if log_every_step and not math.isfinite(float(out.loss.detach())):
                raise RuntimeError(f"non-finite loss at step {step}")
            step += 1
        train_cpu = time.process_time() - started
        row = {k: v / len(loader) for k, v in sums.items()}
        row.update(epoch=epoch, step=step, momentum=model.momentum, train_cpu_s=round(train_cpu, 1))
        with torch.no_grad(), torch.random.fork_rng():
            probe_after = model._key_pass(copy.deepcopy(model.encoder_k if queue_mode else model.encoder_q), probe)
            row["drift"] = float((probe_before * probe_after).sum(1).mean())
            if queue_mode:  # copies in train mode: batch statistics, running statistics untouched
                q_emb = copy.deepcopy(model.encoder_q)(probe)
                k_emb = model._key_pass(copy.deepcopy(model.encoder_k), probe)
                row["qk"] = float((q_emb * k_emb).sum(1).mean())
                row["stale_new"], row["stale_old"] = staleness(model, crops, cfg.global_batch, step)
                q = model.dictionary.queue
                row["spread"] = float((q @ q.T).mean())
        row["knn_top1"] = knn_top1(model.encoder_q.backbone, *knn_data, k=cfg.train.knn_k, t=cfg.train.knn_t)
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/pretrain/quickstart.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--fresh-queue", action="store_true", help="re-encode the whole queue after every step")
    parser.add_argument("--switch", metavar="EPOCH:M", help="set moco.momentum to M after epoch EPOCH")
    args = parser.parse_args()
    switch = None
    if args.switch:
        epoch, momentum = args.switch.split(":")
        switch = (int(epoch), float(momentum))
    cfg = load_config(args.config, SWEEP_BASE + [f"train.epochs={args.epochs}"] + args.overrides)
    print(
        json.dumps(
            {
                "config": {
                    k: v
                    for k, v in cfg.flat().items()
                    if k.startswith(("moco.", "train.lr", "model.bn", "data.digits", "train.batch"))
                }
            }
        )
    )
    run(cfg, args.epochs, log_every_step=True, fresh_queue=args.fresh_queue, switch=switch)


if __name__ == "__main__":
    main()
