"""Linear classification on frozen features: the MoCo papers' protocols, run by Ray Train workers.

Protocol (``eval.lincls``): the backbone is frozen and stays in eval mode (BN statistics untouched);
a linear classifier initialised N(0, 0.01), bias 0, is trained with SGD (momentum 0.9, weight decay 0).
``protocol: moco`` (default for ResNets and small_cnn): lr 30, x0.1 at 60 % and 80 % of the epochs;
``protocol: v3`` (default for timm ViTs, whose features are the class token after the final norm): lr per 256
images (3 for a ViT), cosine per epoch, as the v3 code's ``main_lincls.py`` (``config.resolve_lincls``).
Training images get RandomResizedCrop + horizontal
flip, test images resize + center crop (albumentations); top-1 / top-5 in percent on the test split.
At the end every worker checks that the backbone's weights and BN statistics are bit-identical to
the ones it started with. A NaN/inf loss on any worker stops every worker at that step and ends the run
FAILED with one line (``train/nonfinite.py``).

``fast``: the features of the training images (eval transform, no augmentation) and of the test
images are extracted once, and the same classifier and schedule train on the cached features.
Metrics are then ``lincls_fast_top1/top5``, as the two protocols do not give the same numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import albumentations as A
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from albumentations.pytorch import ToTensorV2
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from mocolab.config import Config, LinclsConfig, resolve_lincls
from mocolab.console import StepProgress, console
from mocolab.tracking.names import LINCLS_FAST_METRICS, LINCLS_METRICS

TOPK = (1, 5)


def metric_names(fast: bool) -> tuple[str, str]:
    """``(top1, top5)`` metric names of the full or fast protocol."""
    return LINCLS_FAST_METRICS if fast else LINCLS_METRICS


def make_classifier(feat_dim: int, num_classes: int) -> nn.Linear:
    """The linear classifier of the protocol: weights N(0, 0.01), bias 0."""
    fc = nn.Linear(feat_dim, num_classes)
    nn.init.normal_(fc.weight, mean=0.0, std=0.01)
    nn.init.zeros_(fc.bias)
    return fc


def peak_lr(lin: LinclsConfig, world_size: int = 1) -> float:
    """The lr of epoch 0: ``lin.lr``, times the global batch / 256 with ``lin.lr_per_256`` (a resolved ``lin``)."""
    return lin.lr * lin.batch_size * world_size / 256 if lin.lr_per_256 else lin.lr


def make_optimizer(classifier: nn.Module, lin: LinclsConfig, world_size: int = 1) -> torch.optim.SGD:
    """The protocol's optimizer of the classifier: SGD with :func:`peak_lr`, ``lin.momentum`` and
    ``lin.weight_decay`` (the epoch's lr is then set by :func:`lr_at_epoch`)."""
    return torch.optim.SGD(
        classifier.parameters(), lr=peak_lr(lin, world_size), momentum=lin.momentum, weight_decay=lin.weight_decay
    )


def freeze(backbone: nn.Module) -> nn.Module:
    """No gradients and eval mode (BN uses, and never updates, its running statistics)."""
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone.eval()


class LinearProbe(nn.Module):
    """A frozen backbone and a trainable linear classifier. ``train()`` switches only the classifier:
    the backbone stays in eval mode, and its forward runs without autograd."""

    def __init__(self, backbone: nn.Module, classifier: nn.Linear):
        super().__init__()
        self.backbone = freeze(backbone)
        self.classifier = classifier

    def train(self, mode: bool = True) -> LinearProbe:
        self.training = mode
        self.classifier.train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images).flatten(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


def milestone_epochs(epochs: int, fractions: Sequence[float]) -> list[int]:
    """Epochs (0-based) from which lr is divided once more by 10: 60 %/80 % of 100 -> [60, 80]."""
    return [int(round(f * epochs)) for f in fractions]


def lr_at_epoch(epoch: int, lin: LinclsConfig, world_size: int = 1) -> float:
    """The lr of ``epoch`` (0-based) from :func:`peak_lr`: x 0.1 per milestone reached (``schedule: step``), or
    ``0.5 (1 + cos(pi epoch / epochs))`` times it (``cosine``, the v3 code's ``adjust_learning_rate``)."""
    lr = peak_lr(lin, world_size)
    if lin.schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / lin.epochs))
    return lr * 0.1 ** sum(epoch >= m for m in milestone_epochs(lin.epochs, lin.milestones))


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = TOPK) -> torch.Tensor:
    """How many rows have their label among the top-k logits, for each k (k is capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return torch.tensor([hits[:, :k].any(dim=1).sum().item() for k in ks], dtype=torch.float64)


class LinearTrainTransform:
    """Training augmentation of the protocol: RandomResizedCrop + horizontal flip, then normalise
    (numpy HWC uint8 RGB -> float tensor [3, S, S])."""

    def __init__(self, image_size: int):
        from mocolab.data.augment import NORMALIZE

        self.pipeline = A.Compose(
            [
                A.RandomResizedCrop(size=(image_size, image_size)),
                A.HorizontalFlip(p=0.5),
                A.Normalize(mean=NORMALIZE["mean"], std=NORMALIZE["std"]),
                ToTensorV2(),
            ]
        )

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.pipeline(image=image)["image"]


def dataset_config(cfg: Config):
    """The data section linear eval uses: ``eval.lincls.dataset``, else ``data``."""
    lin = cfg.eval.lincls or LinclsConfig()
    return lin.dataset or cfg.data


def _all_reduce_sum(values: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(values)
    return values


def feature_batches(features: torch.Tensor, labels: torch.Tensor, batch: int, gen: torch.Generator) -> Iterator:
    """``(features, labels)`` batches of ``batch`` rows in the order of one permutation drawn from ``gen``."""
    order = torch.randperm(len(labels), generator=gen)
    for i in range(0, len(order), batch):
        idx = order[i : i + batch]
        yield features[idx], labels[idx]


def images_and_labels(loader: DataLoader) -> Iterator:
    """``(images, labels)`` batches of a loader collated by ``collate_skip_corrupt`` (skipped images dropped)."""
    for batch, _skipped in loader:
        if batch is not None:
            yield batch


@torch.no_grad()
def extract(probe: LinearProbe, loader: DataLoader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features ``[N, D]`` and labels of every batch of ``loader`` (for the fast protocol)."""
    feats, labels = [], []
    for images, targets in images_and_labels(loader):
        feats.append(probe.features(images.to(device)))
        labels.append(targets.to(device))
    return torch.cat(feats), torch.cat(labels)


def evaluate(logits_of, batches, world_size: int) -> tuple[float, float]:
    """Top-1 / top-5 in percent over every worker's share of the test split."""
    counts = torch.zeros(len(TOPK) + 1, dtype=torch.float64)
    for inputs, labels in batches:
        with torch.no_grad():
            logits = logits_of(inputs)
        counts[:-1] += topk_correct(logits.cpu(), labels.cpu())
        counts[-1] += len(labels)
    counts = _all_reduce_sum(counts, world_size)
    if counts[-1] == 0:
        raise ValueError("linear eval: the test split is empty; check the dataset's test_split and limit_test")
    return tuple((100.0 * counts[:-1] / counts[-1]).tolist())


def lincls_train_loop(config: dict[str, Any]) -> dict[str, float]:
    """Train and evaluate the linear classifier on this Ray Train worker; returns the metrics
    (rank 0's return value becomes the Ray ``Result.return_value``)."""
    import ray.train.torch

    from mocolab.data.augment import eval_transform
    from mocolab.data.datasets import build_labeled_dataset, collate_skip_corrupt, loader_kwargs
    from mocolab.data.sources import num_classes
    from mocolab.evaluate.weights import BackboneSource, assert_unchanged, load_backbone_state, snapshot
    from mocolab.moco.backbones import build_backbone
    from mocolab.runtime import start_worker
    from mocolab.train.nonfinite import INJECT_NAN_STEP_KEY, LossGuard

    worker = start_worker(config, seed=config["config"]["eval"]["lincls"]["seed"])
    cfg, rank, world, device = worker.cfg, worker.rank, worker.world_size, worker.device
    source: BackboneSource = config["source"]
    lin = resolve_lincls(cfg.eval.lincls, source.model.arch)
    data_cfg = dataset_config(cfg)
    started = time.perf_counter()

    model_cfg = source.model.model_copy(update={"bn": "plain"})
    backbone, feat_dim = build_backbone(model_cfg, use_gpu=cfg.scaling.use_gpu, image_size=source.image_size)
    load_backbone_state(backbone, source)
    before = snapshot(backbone)
    classes = num_classes(data_cfg)
    probe = LinearProbe(backbone, make_classifier(feat_dim, classes)).to(device)
    classifier = ray.train.torch.prepare_model(probe.classifier) if world > 1 else probe.classifier
    optimizer = make_optimizer(probe.classifier, lin, world)

    test_transform = eval_transform(data_cfg.image_size)
    train_transform = test_transform if lin.fast else LinearTrainTransform(data_cfg.image_size)
    train_set = build_labeled_dataset(data_cfg, "train", train_transform)
    test_set = build_labeled_dataset(data_cfg, "test", test_transform)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=not lin.fast, seed=lin.seed)
    kwargs = loader_kwargs(data_cfg, cfg.scaling.cpus_per_worker, cfg.scaling.use_gpu)
    kwargs["collate_fn"] = collate_skip_corrupt
    train_loader = DataLoader(train_set, batch_size=lin.batch_size, sampler=sampler, **kwargs)
    test_loader = DataLoader(Subset(test_set, range(rank, len(test_set), world)), batch_size=lin.batch_size, **kwargs)

    if lin.fast:
        train_feats, train_labels = extract(probe, train_loader, device)
        test_feats, test_labels = extract(probe, test_loader, device)
        extract_s = time.perf_counter() - started
        gen = torch.Generator().manual_seed(lin.seed + rank)

    steps = math.ceil(len(train_labels) / lin.batch_size) if lin.fast else len(train_loader)
    bar = StepProgress("lincls", lin.epochs * steps, active=worker.is_chief)
    run_id, nan_at = config.get("mlflow_run_id"), config.get(INJECT_NAN_STEP_KEY)
    guard = LossGuard(bar, world, rank, nan_at, cfg.tracking.tracking_uri, run_id)
    step = 0
    for epoch in range(lin.epochs):
        lr = lr_at_epoch(epoch, lin, world)
        for group in optimizer.param_groups:
            group["lr"] = lr
        probe.train()
        sampler.set_epoch(epoch)
        bar.label = f"lincls epoch {epoch + 1}/{lin.epochs}"
        if lin.fast:
            batches = feature_batches(train_feats, train_labels, lin.batch_size, gen)
        else:
            batches = ((probe.features(x.to(device)), y.to(device)) for x, y in images_and_labels(train_loader))
        total, seen = 0.0, 0
        for feats, labels in batches:
            loss = F.cross_entropy(classifier(feats), labels)
            step += 1
            if guard.mean(loss, step, lambda value: f"loss {value} in epoch {epoch + 1} at step {step}") is None:
                return {}  # every rank returns here: a clean end, which Ray does not retry
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(labels)
            seen += len(labels)
            bar.step(len(labels) * world, loss.detach(), lr)
        if epoch + 1 == lin.epochs:
            bar.close()  # the last epoch's line comes after the finished bar; earlier ones print above it
        if worker.is_chief and (epoch + 1 == lin.epochs or (epoch + 1) % max(1, lin.epochs // 10) == 0):
            console(f"[mocolab lincls] epoch {epoch + 1}/{lin.epochs} loss {total / max(seen, 1):.4f} lr {lr:.4g}")

    probe.eval()
    if lin.fast:
        test_batches = feature_batches(test_feats, test_labels, lin.batch_size, torch.Generator().manual_seed(0))
        top1, top5 = evaluate(probe.classifier, test_batches, world)
    else:
        top1, top5 = evaluate(probe, ((x.to(device), y) for x, y in images_and_labels(test_loader)), world)
    assert_unchanged(before, probe.backbone)
    name1, name5 = metric_names(lin.fast)
    metrics = {name1: top1, name5: top5, "lincls_time_s": time.perf_counter() - started}
    if lin.fast:
        metrics["lincls_extract_s"] = extract_s
    return metrics
