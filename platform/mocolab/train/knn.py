"""Weighted kNN monitor of the MoCo CIFAR-10 demo: how well frozen features separate the classes.

Features are L2-normalised; each test image takes the ``k`` training images of highest cosine
similarity, weights each by ``exp(sim / t)`` and votes for their classes. Features are computed batch
by batch from the loaders, so no second copy of the images is held, only the feature bank.

On several workers (an initialised process group) every rank embeds its rank-strided shard of the bank and of
the test split (:func:`shard`): the bank is all-gathered back into the single-rank order, each rank classifies
its own test images against the whole bank, and the correct counts are summed, so the accuracy is the one a
single rank computes over both splits, in ``1 / world`` of the time. :func:`evenly_spaced` subsamples a split
(``train.knn_bank_images``, ``train.knn_test_images``) for datasets too large to embed every epoch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from mocolab.config import Config
from mocolab.moco.distributed import gather_all, world_size


def evenly_spaced(n: int, limit: int | None) -> list[int]:
    """``limit`` indices of ``range(n)`` spread evenly from the first (all of them when ``limit`` is None or >= n),
    so that a class-ordered split keeps its class balance."""
    if limit is None or limit >= n:
        return list(range(n))
    return [i * n // limit for i in range(limit)]


def shard(indices: Sequence[int], rank: int, world: int) -> list[int]:
    """Rank ``rank``'s share of ``indices``: every ``world``-th one from position ``rank`` (sizes differ by <= 1)."""
    return list(indices[rank::world])


def gather_shards(x: torch.Tensor) -> torch.Tensor:
    """Undo :func:`shard` on per-item rows: every rank passes the rows of its shard, every rank gets all rows in
    the original order (``x`` itself on one worker)."""
    world = world_size()
    if world == 1:
        return x
    counts = gather_all(torch.tensor([x.shape[0]], device=x.device))
    rows, total = int(counts.max()), int(counts.sum())
    padded = x.new_zeros((rows, *x.shape[1:]))
    padded[: x.shape[0]] = x
    by_rank = gather_all(padded).view(world, rows, *x.shape[1:])
    return by_rank.transpose(0, 1).reshape(world * rows, *x.shape[1:])[:total]


@torch.no_grad()
def extract_features(
    backbone: nn.Module, loader: Iterable, device: torch.device | None = None, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 features ``[N, D]`` (L2-normalised unless ``normalize=False``) and labels ``[N]`` of every ``(image,
    label)`` batch of ``loader``, on ``device`` (``None`` batches, whose images were all skipped as corrupt, are
    passed over).

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
                images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            out = backbone(images).flatten(1).float()
            feats.append(F.normalize(out, dim=1) if normalize else out)
            labels.append(targets)
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


def knn_correct(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    t: float,
    chunk: int = 1024,
) -> int:
    """How many ``queries`` :func:`knn_predict` classifies as ``labels``, in chunks of ``chunk`` rows. Classes the
    bank lacks can never be predicted, so the bank's labels alone size the vote."""
    num_classes = int(bank_labels.max()) + 1
    correct = 0
    for start in range(0, queries.shape[0], chunk):
        pred = knn_predict(queries[start : start + chunk], bank, bank_labels, num_classes, k, t)
        correct += int((pred == labels[start : start + chunk]).sum())
    return correct


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int,
    t: float,
    chunk: int = 1024,
) -> float:
    """Top-1 accuracy in percent (0-100, as in the paper) of :func:`knn_predict` over the test features."""
    return 100.0 * knn_correct(train_feats, train_labels, test_feats, test_labels, k, t, chunk) / test_feats.shape[0]


def knn_top1(
    backbone: nn.Module,
    train_loader: Iterable,
    test_loader: Iterable,
    k: int,
    t: float,
    device: torch.device | None = None,
) -> float:
    """Weighted kNN top-1 accuracy in percent of ``backbone``'s features: bank = train split, queries = test split.

    Under a process group every rank calls it with loaders over its :func:`shard` of each split and the same
    backbone (weights and BN statistics); all ranks return the single-rank accuracy."""
    bank, bank_labels = (gather_shards(x) for x in extract_features(backbone, train_loader, device))
    queries, labels = extract_features(backbone, test_loader, device)
    counts = torch.tensor(
        [knn_correct(bank, bank_labels, queries, labels, k, t), labels.shape[0]],
        dtype=torch.long,
        device=queries.device,
    )
    if world_size() > 1:
        dist.all_reduce(counts)
    correct, total = counts.tolist()
    return 100.0 * correct / total


def knn_loaders(cfg: Config, rank: int = 0, world_size: int = 1) -> tuple[DataLoader, DataLoader]:
    """Loaders of rank ``rank``'s shard (``train/knn.py``) of the kNN monitor's labeled data
    (:attr:`Config.knn_data`): the bank (its train split, at most ``train.knn_bank_images`` of it) and the queries
    (its test split, at most ``train.knn_test_images``), with the evaluation transform; one rank of one gets both
    splits whole. They decode in as many worker processes as the training loader (started per evaluation, not
    kept between epochs).

    They get their own generator so that the monitor leaves the training RNG streams untouched
    (a resumed run then replays exactly what an uninterrupted one does)."""
    from torch.utils.data import Subset

    from mocolab.data.augment import eval_transform
    from mocolab.data.datasets import build_labeled_dataset, resolve_loader_workers

    data_cfg = cfg.knn_data
    transform = eval_transform(data_cfg.image_size)
    workers = resolve_loader_workers(data_cfg, cfg.scaling.cpus_per_worker)
    loaders = []
    for split, limit in (("train", cfg.train.knn_bank_images), ("test", cfg.train.knn_test_images)):
        dataset = build_labeled_dataset(data_cfg, split, transform)
        indices = shard(evenly_spaced(len(dataset), limit), rank, world_size)
        loaders.append(
            DataLoader(
                Subset(dataset, indices),
                batch_size=max(cfg.train.batch_size, 256),
                shuffle=False,
                collate_fn=_collate_labeled,
                generator=torch.Generator().manual_seed(cfg.train.seed),
                num_workers=workers,
                pin_memory=cfg.scaling.use_gpu,
            )
        )
    return loaders[0], loaders[1]


def _collate_labeled(batch: list) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(images, labels)`` without the skipped corrupt images (None if all were skipped)."""
    from mocolab.data.datasets import collate_skip_corrupt

    return collate_skip_corrupt(batch)[0]
