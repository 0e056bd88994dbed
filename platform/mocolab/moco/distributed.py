"""Collectives of the MoCo step over ``torch.distributed`` (gloo or nccl): gathers, the shuffle-BN shuffle and
the differentiable all-reduce of synchronised BN.

Every function also works without an initialised process group (one worker): gathers are the identity and
the shuffle permutes the local batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mocolab.moco.functional import inverse_permutation, shuffle_permutation


def world_size() -> int:
    """Number of workers in the default process group (1 when none is initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This worker's rank in the default process group (0 when none is initialised)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def gather_all(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` of every worker along dim 0 in rank order (no gradient); ``x`` on one worker."""
    return x.detach() if world_size() == 1 else _all_gather_cat(x)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums the incoming gradients over workers and returns this worker's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        return _all_gather_cat(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_all_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Like :func:`gather_all`, but differentiable: this worker's rows keep their graph, and the gradients that
    other workers' losses send to these rows arrive through an all-reduce in backward (every worker must run
    backward). ``x`` itself on one worker."""
    return x if world_size() == 1 else _GatherWithGrad.apply(x)


class _AllReduceWithGrad(torch.autograd.Function):
    """Sum over workers whose backward also sums: every worker's input feeds every worker's output."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over workers, differentiable on any backend (gloo included; every worker must run
    backward). ``x`` itself on one worker. (``torch.distributed.nn.functional.all_reduce`` does the same
    but is deprecated in torch 2.14.)"""
    return x if world_size() == 1 else _AllReduceWithGrad.apply(x)


@torch.no_grad()
def shuffle_across_workers(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle-BN's shuffle: gather the batches of all workers, permute them with a permutation drawn on rank 0
    and broadcast, and return this worker's slice of the permuted global batch (same size as ``x``) with the
    index that undoes the permutation (for :func:`unshuffle_across_workers`)."""
    everything = gather_all(x)
    perm = shuffle_permutation(everything.shape[0], device=x.device)
    if world_size() > 1:
        dist.broadcast(perm, src=0)
    start = rank() * x.shape[0]
    return everything[perm[start : start + x.shape[0]]], inverse_permutation(perm)


def unshuffle_across_workers(y: torch.Tensor, unshuffle_index: torch.Tensor) -> torch.Tensor:
    """Undo :func:`shuffle_across_workers` on its outputs ``y``: this worker gets back the rows of its own
    samples, in their original order. Differentiable when ``y`` requires grad (end-to-end keys)."""
    everything = gather_all_with_grad(y) if y.requires_grad else gather_all(y)
    start = rank() * y.shape[0]
    return everything[unshuffle_index[start : start + y.shape[0]]]
