"""Collectives of the MoCo step over ``torch.distributed`` (gloo or nccl): gathers and the shuffle-BN shuffle.

The shuffle is an all-to-all (:func:`shuffle_across_workers`), equal in result to the official code's
all-gather (:func:`shuffle_by_gather`, kept as its reference) but moving about one batch per worker whatever the
number of workers. Every function also works without an initialised process group (one worker): gathers are the
identity and the shuffle permutes the local batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mocolab.moco.functional import ShufflePlan, inverse_permutation, shuffle_permutation, shuffle_plan


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


def _draw_permutation(n: int, device: torch.device) -> torch.Tensor:
    """A random permutation of ``range(n)`` drawn on rank 0 and broadcast (every rank draws one, as the official
    code does, so every rank's RNG advances alike)."""
    perm = shuffle_permutation(n, device=device)
    if world_size() > 1:
        dist.broadcast(perm, src=0)
    return perm


def _all_to_all(x: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
    """``x``'s rows, ``send_counts[r]`` of them to rank ``r`` in order; returns the rows received, by source rank."""
    if world_size() == 1:
        return x
    received = x.new_empty((sum(recv_counts), *x.shape[1:]))
    dist.all_to_all_single(received, x.contiguous(), output_split_sizes=recv_counts, input_split_sizes=send_counts)
    return received


class _AllToAllWithGrad(torch.autograd.Function):
    """:func:`_all_to_all` whose backward sends each row's gradient back to the rank and row it came from."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        ctx.counts = (send_counts, recv_counts)
        return _all_to_all(x, send_counts, recv_counts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        send_counts, recv_counts = ctx.counts
        return _all_to_all(grad, recv_counts, send_counts), None, None


@torch.no_grad()
def shuffle_across_workers(x: torch.Tensor) -> tuple[torch.Tensor, ShufflePlan]:
    """Shuffle-BN's shuffle by one all-to-all: the result equals :func:`shuffle_by_gather`'s for the same
    permutation (drawn on rank 0 and broadcast; this worker's slice of the permuted global batch, same size as
    ``x``), but each worker receives only the rows that come from other workers, about ``B`` whatever the number
    of workers. Returns the shuffled batch and the plan :func:`unshuffle_across_workers` needs."""
    perm = _draw_permutation(world_size() * x.shape[0], x.device)
    plan = shuffle_plan(perm.cpu(), world_size(), rank()).to(x.device)  # split sizes are host ints
    return _all_to_all(x[plan.send_rows], plan.send_counts, plan.recv_counts)[plan.from_arrival], plan


def unshuffle_across_workers(y: torch.Tensor, plan: ShufflePlan) -> torch.Tensor:
    """Undo :func:`shuffle_across_workers` on its outputs ``y`` (e.g. keys ``[B, dim]``) by the reverse all-to-all:
    this worker gets back the rows of its own samples, in their original order; rows that stayed on this worker
    do not travel. Differentiable when ``y`` requires grad (end-to-end keys): each row's gradient goes back to
    the worker and row that computed it (every worker must run backward)."""
    sent = y[plan.arrival_slots]
    returned = _AllToAllWithGrad.apply(sent, plan.recv_counts, plan.send_counts) if world_size() > 1 else sent
    return returned[plan.from_return]


@torch.no_grad()
def shuffle_by_gather(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official MoCo code's shuffle, the reference of :func:`shuffle_across_workers` (tests compare them,
    ``mocolab bench --what shuffle`` times both): all-gather every worker's batch, permute it with a permutation
    drawn on rank 0 and broadcast, keep this worker's slice. Each worker receives ``(W - 1) * B`` rows. Returns
    the slice and the index that undoes the permutation (for :func:`unshuffle_by_gather`)."""
    everything = gather_all(x)
    perm = _draw_permutation(everything.shape[0], x.device)
    start = rank() * x.shape[0]
    return everything[perm[start : start + x.shape[0]]], inverse_permutation(perm)


def unshuffle_by_gather(y: torch.Tensor, unshuffle_index: torch.Tensor) -> torch.Tensor:
    """Undo :func:`shuffle_by_gather` on its outputs ``y`` by all-gathering them (differentiable as
    :func:`gather_all_with_grad` when ``y`` requires grad)."""
    everything = gather_all_with_grad(y) if y.requires_grad else gather_all(y)
    start = rank() * y.shape[0]
    return everything[unshuffle_index[start : start + y.shape[0]]]
