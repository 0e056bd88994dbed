"""Batch-norm variants: SplitBatchNorm (shuffle-BN on one worker) and the ``model.bn`` conversion helper;
AllReduceBatchNorm2d/1d (synchronised BN on any backend, gloo included) and its conversion helper."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mocolab.moco.distributed import all_reduce_with_grad, world_size

BN_MODES = ("shuffle", "split", "sync", "plain")


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises ``num_splits`` sub-batches separately (sub-batch ``s`` is the
    samples ``s, s + num_splits, s + 2 num_splits, ...``) and keeps the running statistics averaged over
    the splits, as in the MoCo CIFAR-10 demo. In eval mode it is an ordinary BatchNorm2d.

    Its parameters and buffers are those of BatchNorm2d, so its ``state_dict`` keys are plain BN keys.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        if num_splits < 1:
            raise ValueError(f"model.bn_splits={num_splits} must be >= 1")
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        n, c = x.shape[:2]
        if n % self.num_splits:
            raise ValueError(
                f"SplitBatchNorm2d: batch of {n} is not divisible by model.bn_splits={self.num_splits}; "
                "choose train.batch_size as a multiple of it"
            )
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        # [N, C, ...] -> [N / S, S * C, ...]: channel s * C + c of row a is channel c of sample a * S + s.
        grouped = x.reshape(n // self.num_splits, self.num_splits * c, *x.shape[2:])
        split_mean = split_var = None
        if self.track_running_stats:
            split_mean = self.running_mean.repeat(self.num_splits)
            split_var = self.running_var.repeat(self.num_splits)
        weight = self.weight.repeat(self.num_splits) if self.affine else None
        bias = self.bias.repeat(self.num_splits) if self.affine else None
        out = F.batch_norm(grouped, split_mean, split_var, weight, bias, True, momentum, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.copy_(split_mean.view(self.num_splits, c).mean(dim=0))
                self.running_var.copy_(split_var.view(self.num_splits, c).mean(dim=0))
        return out.view_as(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"


class _AllReduceBatchNorm:
    """Training-mode forward of a BatchNorm that normalises with the statistics of the global batch (all
    workers): each worker's per-channel sum, sum of squares and element count are summed over the default process
    group by a differentiable all-reduce, so gradients flow through the shared statistics as in
    ``torch.nn.SyncBatchNorm``, but on any backend (gloo on CPU, where SyncBatchNorm refuses to run).
    Workers are weighted by their element counts (images of different sizes count by their pixels), as
    detectron2's ``NaiveSyncBatchNorm(stats_mode="N")``. With one worker, or in eval mode, it is the plain BN.
    Its ``state_dict`` keys are plain BN keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        c = x.shape[1]
        dims = (0, *range(2, x.dim()))
        local = torch.cat([x.sum(dims), (x * x).sum(dims), x.new_full((1,), x.numel() / c)])
        total = all_reduce_with_grad(local)
        count = total[-1]
        mean = total[:c] / count
        var = (total[c : 2 * c] / count - mean * mean).clamp_min(0)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), float(count.detach()))
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight
        shift = -mean * scale + (self.bias if self.affine else 0)
        shape = (1, c) + (1,) * (x.dim() - 2)
        return x * scale.view(shape) + shift.view(shape)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.lerp_(mean, momentum)
        self.running_var.lerp_(var * count / max(count - 1, 1), momentum)  # unbiased, as BatchNorm keeps it


class AllReduceBatchNorm2d(_AllReduceBatchNorm, nn.BatchNorm2d):
    """BatchNorm2d synchronised over workers on any backend (see :class:`_AllReduceBatchNorm`)."""


class AllReduceBatchNorm1d(_AllReduceBatchNorm, nn.BatchNorm1d):
    """BatchNorm1d synchronised over workers on any backend (MoCo v3's projector and predictor MLPs)."""


ALL_REDUCE_VARIANTS = {nn.BatchNorm2d: AllReduceBatchNorm2d, nn.BatchNorm1d: AllReduceBatchNorm1d}


def to_allreduce_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm2d / BatchNorm1d replaced by :class:`AllReduceBatchNorm2d` /
    :class:`AllReduceBatchNorm1d` holding the same weights and running statistics (FrozenBatchNorm2d and other
    norms are left alone)."""
    if type(module) in ALL_REDUCE_VARIANTS:
        synced = ALL_REDUCE_VARIANTS[type(module)](
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        synced.load_state_dict(module.state_dict(), assign=True)  # keeps the tensors (and their device)
        if module.affine:  # assign=True does not keep requires_grad (frozen stages stay frozen)
            synced.weight.requires_grad_(module.weight.requires_grad)
            synced.bias.requires_grad_(module.bias.requires_grad)
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        setattr(module, name, to_allreduce_batchnorm(child))
    return module


def sync_batchnorm(module: nn.Module, use_gpu: bool) -> nn.Module:
    """``module`` with every BN synchronised across workers: torch.nn.SyncBatchNorm on GPU, the all-reduce BN
    (gloo) on CPU."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(module) if use_gpu else to_allreduce_batchnorm(module)


def convert_batchnorm(module: nn.Module, mode: str, splits: int = 1, use_gpu: bool = True) -> nn.Module:
    """Return ``module`` with its BatchNorm layers set up for ``model.bn``:

    ``split`` -> SplitBatchNorm2d(``splits``); ``sync`` -> :func:`sync_batchnorm` (SyncBatchNorm with
    ``use_gpu``, else the all-reduce BN);
    ``shuffle`` and ``plain`` -> unchanged BatchNorm2d (shuffle-BN happens in the model's key path).
    Weights and running statistics are carried over.
    """
    if mode not in BN_MODES:
        raise ValueError(f"model.bn={mode!r} is not one of {', '.join(BN_MODES)}")
    if mode == "sync":
        return sync_batchnorm(module, use_gpu)
    if mode == "split":
        return _to_split(module, splits)
    return module


def _to_split(module: nn.Module, splits: int) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SplitBatchNorm2d):
        split = SplitBatchNorm2d(
            module.num_features,
            splits,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        split.load_state_dict(module.state_dict(), assign=True)  # keeps the tensors (and their device)
        split.train(module.training)
        return split
    for name, child in module.named_children():
        setattr(module, name, _to_split(child, splits))
    return module
