"""The pure math of a MoCo step: InfoNCE logits and loss, momentum update, queue FIFO, permutations and the
all-to-all shuffle's plan.

No Ray and no ``torch.distributed`` here: every function works on plain tensors and is unit-tested alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

Negatives = torch.Tensor | Sequence[torch.Tensor]


def infonce_logits(
    q: torch.Tensor, k: torch.Tensor, negatives: Negatives, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE logits ``[B, 1 + K]`` with the positive ``q_i . k_i`` at column 0, and labels (zeros, long).

    ``q``, ``k``: ``[B, dim]`` (normalised); ``negatives``: ``[K, dim]``, or a sequence of row blocks that
    together are the ``K`` negatives (lets a queue be read in pieces without copying it).
    The temperature is applied to ``q`` once instead of to the ``[B, 1 + K]`` logits.
    """
    blocks = [negatives] if isinstance(negatives, torch.Tensor) else list(negatives)
    q_scaled = q / temperature
    positive = (q_scaled * k).sum(dim=1, keepdim=True)
    logits = torch.cat([positive] + [q_scaled @ block.T for block in blocks], dim=1)
    return logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device)


def in_batch_logits(
    q: torch.Tensor, keys: torch.Tensor, positive_index: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[B, N]`` of queries against all ``N`` keys of a batch, reordered so that each query's own
    key (row ``positive_index[i]`` of ``keys``) is column 0 and the other ``N - 1`` keys follow in order.

    The end-to-end mechanism: the dictionary is the (global) batch of keys.
    """
    all_logits = (q / temperature) @ keys.T
    n = keys.shape[0]
    others = torch.arange(n - 1, device=q.device).expand(q.shape[0], n - 1)
    others = others + (others >= positive_index[:, None]).long()  # skip the positive's column
    order = torch.cat([positive_index[:, None], others], dim=1)
    return all_logits.gather(1, order), torch.zeros(q.shape[0], dtype=torch.long, device=q.device)


def infonce_loss(logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the logits with the positive at column 0 (labels default to zeros)."""
    if labels is None:
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels)


@torch.no_grad()
def momentum_update_(target_params: Sequence[torch.Tensor], source_params: Sequence[torch.Tensor], m: float) -> None:
    """``target = m * target + (1 - m) * source`` for every pair, in place, as one fused foreach op.

    Build the two lists once (e.g. ``list(module.parameters())``) and pass them every step.
    ``m = 0`` copies the source exactly, ``m = 1`` keeps the target exactly.
    """
    if len(target_params) != len(source_params):
        raise ValueError(f"momentum_update_: {len(target_params)} target vs {len(source_params)} source tensors")
    torch._foreach_lerp_(target_params, source_params, 1.0 - m)


@torch.no_grad()
def enqueue_(queue: torch.Tensor, ptr: int, keys: torch.Tensor) -> int:
    """Write ``keys [n, dim]`` into rows ``ptr .. ptr + n`` of ``queue [K, dim]`` in place (FIFO: these rows
    hold the oldest keys) and return the next pointer, which wraps to 0 at the end.

    ``K`` must be a multiple of ``n`` and ``ptr`` a multiple of ``n``, so a batch never straddles the end.
    """
    capacity, n = queue.shape[0], keys.shape[0]
    if keys.shape[1:] != queue.shape[1:]:
        raise ValueError(
            f"enqueue_: keys of shape {tuple(keys.shape)} do not fit a queue of shape {tuple(queue.shape)}"
        )
    if capacity % n or ptr % n or not 0 <= ptr < capacity:
        raise ValueError(
            f"enqueue_: queue size {capacity} must be a multiple of the key batch {n} (moco.queue_size vs the "
            f"global batch) and ptr={ptr} a multiple of it below the size"
        )
    queue[ptr : ptr + n] = keys
    return (ptr + n) % capacity


@torch.no_grad()
def memory_bank_update_(bank: torch.Tensor, index: torch.Tensor, keys: torch.Tensor, momentum: float) -> None:
    """InstDisc's memory update, in place: rows ``index`` of ``bank [N, dim]`` become
    ``normalize(momentum * bank[index] + (1 - momentum) * keys)``; no other row changes."""
    mixed = bank.index_select(0, index).mul_(momentum).add_(keys.to(bank.dtype), alpha=1.0 - momentum)
    bank.index_copy_(0, index, F.normalize(mixed, dim=1))


def sample_excluding(n: int, excluded: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` indices drawn uniformly, with replacement, from ``range(n)`` without the values in ``excluded``
    (long, on ``excluded``'s device; the global torch RNG of that device draws them).

    The ``r``-th allowed index is ``r`` plus the number of excluded values at or below it, found by one
    ``searchsorted`` over the sorted excluded values (no ``[n]``-sized mask)."""
    excluded = torch.unique(excluded)  # sorted
    allowed = n - excluded.numel()
    if allowed < 1:
        raise ValueError(f"sample_excluding: all {n} indices are excluded")
    draws = torch.randint(allowed, (k,), device=excluded.device)
    # excluded[j] - j = allowed indices below excluded[j]; draws at or past it skip over excluded[j]
    allowed_below = excluded - torch.arange(excluded.numel(), device=excluded.device)
    return draws + torch.searchsorted(allowed_below, draws, right=True)


def shuffle_permutation(n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """A uniformly random permutation of ``range(n)`` (long), from ``generator`` if given."""
    if generator is not None:
        return torch.randperm(n, generator=generator, device=generator.device).to(device or generator.device)
    return torch.randperm(n, device=device)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """The permutation ``inv`` with ``x[perm][inv] == x``."""
    return torch.argsort(perm)


@dataclass(frozen=True)
class ShufflePlan:
    """One worker's part in the all-to-all shuffle of a global batch by a permutation (see :func:`shuffle_plan`).

    ``send_rows``: this worker's local rows in sending order (grouped by destination rank, in rank order);
    ``send_counts`` / ``recv_counts``: rows sent to / received from each rank (``all_to_all_single``'s input /
    output split sizes); ``arrival_slots``: the slot of the shuffled local batch each received row fills, in
    arrival order (grouped by source rank). ``from_arrival`` and ``from_return`` invert ``arrival_slots`` and
    ``send_rows``: shuffled batch = ``received[from_arrival]``; own rows = ``returned[from_return]`` where the
    unshuffle returns the rows in sending order."""

    send_rows: torch.Tensor
    send_counts: list[int]
    recv_counts: list[int]
    arrival_slots: torch.Tensor
    from_arrival: torch.Tensor
    from_return: torch.Tensor

    def to(self, device: torch.device) -> ShufflePlan:
        """The same plan with its index tensors on ``device`` (itself if they are there)."""
        if self.send_rows.device == device:
            return self
        move = {k: getattr(self, k).to(device) for k in ("send_rows", "arrival_slots", "from_arrival", "from_return")}
        return ShufflePlan(send_counts=self.send_counts, recv_counts=self.recv_counts, **move)


def shuffle_plan(perm: torch.Tensor, world: int, rank: int) -> ShufflePlan:
    """Worker ``rank``'s plan for shuffling a global batch of ``world`` equal local batches by ``perm`` (on the
    CPU): as if all batches were concatenated in rank order and indexed by ``perm``, with worker ``r`` keeping
    slots ``[r * B, (r + 1) * B)`` (the gather shuffle's result), but each worker sends only the rows that land
    elsewhere. Rows travel in increasing global slot order, so sender and receiver agree without messages.
    Computed in numpy: a dozen tiny ops, each several times cheaper than a torch call."""
    n = perm.numel()
    if world < 1 or not 0 <= rank < world or n % world:
        raise ValueError(f"shuffle_plan: a permutation of {n} cannot split into {world} equal batches (rank {rank})")
    batch = n // world
    perm = perm.numpy()
    owner = perm // batch  # rank holding the sample that lands in each global slot
    my_slots = np.flatnonzero(owner == rank)  # global slots my samples land in, ascending = by destination
    send_rows = perm[my_slots] - rank * batch
    slot_owner = owner[rank * batch : (rank + 1) * batch]
    arrival_slots = np.argsort(slot_owner, kind="stable")  # grouped by source rank, slot order within a source
    return ShufflePlan(
        send_rows=torch.from_numpy(send_rows),
        send_counts=np.bincount(my_slots // batch, minlength=world).tolist(),
        recv_counts=np.bincount(slot_owner, minlength=world).tolist(),
        arrival_slots=torch.from_numpy(arrival_slots),
        from_arrival=torch.from_numpy(_inverse(arrival_slots)),
        from_return=torch.from_numpy(_inverse(send_rows)),
    )


def _inverse(perm: np.ndarray) -> np.ndarray:
    inverse = np.empty_like(perm)
    inverse[perm] = np.arange(perm.size)
    return inverse
