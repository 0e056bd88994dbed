"""Weighted kNN monitor of the MoCo CIFAR-10 demo: how well frozen features separate the classes.

Features are L2-normalised; each test image takes the ``k`` training images of highest cosine
similarity, weights each by ``exp(sim / t)`` and votes for their classes. Features are computed batch
by batch from the loaders, so no second copy of the images is held, only the feature bank.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def extract_features(
    backbone: nn.Module, loader: Iterable, device: Optional[torch.device] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features ``[N, D]`` and labels ``[N]`` of every ``(image, label)`` batch of ``loader``
    (``None`` batches, whose images were all skipped as corrupt, are passed over).

    The backbone runs in eval mode; its previous mode is restored afterwards."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    try:
        for batch in loader:
            if batch is None:
                continue
            images, targets = batch
            if device is not None:
                images = images.to(device, non_blocking=True)
            feats.append(F.normalize(backbone(images).float(), dim=1).cpu())
            labels.append(targets.cpu())
    finally:
        backbone.train(was_training)
    if not feats:
        raise ValueError("kNN monitor: the loader yielded no images; check data.limit_train/limit_test and the split")
    return torch.cat(feats), torch.cat(labels)


def knn_predict(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int,
    t: float,
) -> torch.Tensor:
    """Predicted class of each normalised ``query [B, D]`` by a weighted vote of its ``k`` nearest rows
    of the normalised ``bank [N, D]`` (weights ``exp(cos_sim / t)``)."""
    k = min(k, bank.shape[0])
    sim = query @ bank.T  # [B, N] cosine similarities
    top_sim, top_idx = sim.topk(k, dim=1)
    weights = (top_sim / t).exp()
    votes = torch.zeros(query.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    votes.scatter_add_(1, bank_labels[top_idx], weights)
    return votes.argmax(dim=1)


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int,
    t: float,
    chunk: int = 1024,
) -> float:
    """Top-1 accuracy in percent (0-100, as in the paper) of :func:`knn_predict` over the test
    features, classified in chunks of ``chunk`` rows."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct = 0
    for start in range(0, test_feats.shape[0], chunk):
        pred = knn_predict(test_feats[start : start + chunk], train_feats, train_labels, num_classes, k, t)
        correct += int((pred == test_labels[start : start + chunk]).sum())
    return 100.0 * correct / test_feats.shape[0]


def knn_top1(
    backbone: nn.Module,
    train_loader: Iterable,
    test_loader: Iterable,
    k: int,
    t: float,
    device: Optional[torch.device] = None,
) -> float:
    """Weighted kNN top-1 accuracy in percent of ``backbone``'s features: bank = train split, queries = test split."""
    train_feats, train_labels = extract_features(backbone, train_loader, device)
    test_feats, test_labels = extract_features(backbone, test_loader, device)
    return knn_accuracy(train_feats, train_labels, test_feats, test_labels, k, t)
