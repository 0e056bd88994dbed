"""The linear probe a pretraining run takes after its last epoch (``train.linear_probe``): ``eval.lincls``'s fast
protocol with its defaults for the backbone (``config.resolve_lincls``; for ResNets and small_cnn: frozen
features extracted once without augmentation, a linear classifier N(0, 0.01), SGD lr 30, momentum 0.9, 100 epochs,
x0.1 at 60 % and 80 %), trained in the worker's process on the kNN monitor's images, so a sweep or a
reproduction gets the paper's metric beside kNN without a second Ray Train job.

Under a process group every rank embeds its shard of both splits, the features are all-gathered, and every rank
fits the same classifier from the same seed: all ranks return the same accuracy."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from mocolab.config import LinclsConfig, resolve_lincls
from mocolab.evaluate.lincls import evaluate, feature_batches, lr_at_epoch, make_classifier, make_optimizer
from mocolab.train.knn import extract_features, gather_shards


def probe_protocol(arch: str, seed: int = 0) -> LinclsConfig:
    """The probe's protocol for backbone ``arch``: ``eval.lincls``'s fast protocol with its defaults, seeded with
    ``seed`` (the run's ``train.seed``)."""
    return resolve_lincls(LinclsConfig(fast=True, seed=seed), arch)


def fit_linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    lin: LinclsConfig,
) -> float | None:
    """Top-1 (%) on the test features of a linear classifier trained on the train features per ``lin`` (one
    process, seed ``lin.seed``); None when the loss turns non-finite."""
    torch.manual_seed(lin.seed)
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    classifier = make_classifier(train_feats.shape[1], classes).to(train_feats.device)
    optimizer = make_optimizer(classifier, lin)
    gen = torch.Generator().manual_seed(lin.seed)
    for epoch in range(lin.epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr_at_epoch(epoch, lin)
        for feats, labels in feature_batches(train_feats, train_labels, lin.batch_size, gen):
            loss = F.cross_entropy(classifier(feats), labels)
            if not math.isfinite(loss.item()):
                return None
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    test = feature_batches(test_feats, test_labels, lin.batch_size, torch.Generator().manual_seed(0))
    return evaluate(classifier, test, world_size=1)[0]


def linear_probe_top1(
    backbone: nn.Module,
    arch: str,
    train_loader: Iterable,
    test_loader: Iterable,
    device: torch.device | None = None,
    seed: int = 0,
) -> float | None:
    """:func:`fit_linear_probe` with :func:`probe_protocol` (seeded with ``seed``, the run's ``train.seed``) on
    ``backbone``'s frozen features (train split -> test split); under a process group every rank passes loaders
    over its shard of each split and gets the single-rank result."""
    train = [gather_shards(x) for x in extract_features(backbone, train_loader, device, normalize=False)]
    test = [gather_shards(x) for x in extract_features(backbone, test_loader, device, normalize=False)]
    return fit_linear_probe(*train, *test, probe_protocol(arch, seed))
