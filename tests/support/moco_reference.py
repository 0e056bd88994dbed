"""A plain re-implementation of the MoCo step, for tests: written from the algorithm (He et al., CVPR 2020,
Algorithm 1 and section 3.3; the official builder's batch shuffle, unshuffle and enqueue; the CIFAR-10 demo's
split BN and symmetric loss), with no mocolab import, so that mocolab's step can be compared with it.

The world of ``world`` ranks with ``batch`` samples each is simulated in one process over the global batch (rank
r owns rows ``r * batch .. (r + 1) * batch - 1``): the all-gather is the global batch itself, the batch shuffle
permutes it with a given permutation, rank r encodes rows ``r * batch ..`` of the shuffled batch, and the unshuffle
gives every sample its own key back. BN statistics are those of one forward call, so each rank's slice goes through
the encoder as its own call: that is what decides which keys share BN statistics. With ``splits`` > 1 (SplitBN, the
CIFAR demo's one-GPU shuffle BN) every rank's slice is further cut into ``splits`` strided sub-batches (positions
s, s + splits, s + 2 splits, ...), each its own call. The encoders are copies of the model's with every BN layer a
plain ``nn.BatchNorm2d``; features are L2-normalised here, as in the official builder.

The reference returns each rank's logits and loss (before DDP averages anything) and its ``loss``, the mean over
ranks, whose gradient is the one DDP leaves on every rank.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def combine_directions(losses: list[torch.Tensor]) -> torch.Tensor:
    """A rank's loss from its per-direction losses (two with the symmetric loss): their sum, as the MoCo CIFAR-10
    demo's ``loss_12 + loss_21`` (mocolab's rule, see ``moco.symmetric``)."""
    return torch.stack(losses).sum()


def plain_bn_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every BatchNorm2d (subclasses such as SplitBatchNorm2d included) replaced by
    a plain ``nn.BatchNorm2d`` holding the same weights and statistics."""
    module = copy.deepcopy(module)
    _to_plain_bn(module)
    return module


def _to_plain_bn(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and type(child) is not nn.BatchNorm2d:
            plain = nn.BatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            plain.load_state_dict(child.state_dict())
            setattr(module, name, plain.train(child.training))
        else:
            _to_plain_bn(child)


def bn_batches(world: int, batch: int, splits: int = 1) -> list[torch.Tensor]:
    """The rows of a global batch that one forward call normalises together: each rank's rows, cut into ``splits``
    strided sub-batches."""
    return [r * batch + s + splits * torch.arange(batch // splits) for r in range(world) for s in range(splits)]


class Net(nn.Module):
    """An encoder: backbone then projection head (the same parameter names as mocolab's encoders)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = plain_bn_copy(backbone)
        self.head = plain_bn_copy(head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def encode(net: nn.Module, x: torch.Tensor, calls: list[torch.Tensor]) -> torch.Tensor:
    """Normalised features of ``x``, each group of rows in ``calls`` encoded by its own forward call."""
    rows = torch.cat(calls)
    features = torch.cat([net(x[group]) for group in calls])
    return F.normalize(features[torch.argsort(rows)], dim=1)


@dataclass
class Direction:
    """One direction of the loss: queries, their keys (global batch order), logits and labels (global rows)."""

    q: torch.Tensor
    k: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor


@dataclass
class Step:
    """What one reference step computed: its directions, each rank's loss and the mean over ranks."""

    directions: list[Direction]
    rank_losses: list[torch.Tensor]
    loss: torch.Tensor


class ReferenceMoCo:
    """MoCo (``mechanism="moco"``: momentum key encoder and a queue ``[dim, K]`` whose columns are keys, as in the
    official builder) or end-to-end (``"end_to_end"``: keys from the query encoder with gradient, the global batch
    of keys as the dictionary) on a simulated world. ``queue`` is the initial queue as rows ``[K, dim]``."""

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        *,
        mechanism: str,
        world: int,
        batch: int,
        temperature: float,
        momentum: float = 0.0,
        queue: torch.Tensor | None = None,
        splits: int = 1,
        symmetric: bool = False,
    ) -> None:
        self.mechanism, self.world, self.batch = mechanism, world, batch
        self.temperature, self.momentum, self.symmetric = temperature, momentum, symmetric
        self.calls = bn_batches(world, batch, splits)
        self.f_q = Net(backbone, head).train()
        if mechanism == "moco":
            self.f_k = copy.deepcopy(self.f_q)  # initialised as the query encoder, never trained by gradient
            self.f_k.requires_grad_(False)
            self.queue = queue.detach().T.clone()
            self.ptr = 0

    def rows_of(self, rank: int) -> slice:
        """The global rows of ``rank``'s samples."""
        return slice(rank * self.batch, (rank + 1) * self.batch)

    def step(self, im_q: torch.Tensor, im_k: torch.Tensor, perms: list[torch.Tensor]) -> Step:
        """One step on the global batch ``im_q``, ``im_k`` ``[world * batch, ...]``; ``perms`` are the shuffle
        permutations of the key batches, one per direction (direction 1: queries of ``im_q``, keys of ``im_k``;
        direction 2 with the symmetric loss: queries of ``im_k``, keys of ``im_q``)."""
        pairs = [(im_q, im_k), (im_k, im_q)] if self.symmetric else [(im_q, im_k)]
        queries = [encode(self.f_q, crop, self.calls) for crop, _ in pairs]
        if self.mechanism == "moco":
            with torch.no_grad():
                for p_k, p_q in zip(self.f_k.parameters(), self.f_q.parameters()):
                    p_k.mul_(self.momentum).add_(p_q, alpha=1.0 - self.momentum)
                keys = [self._keys(self.f_k, crop, perm) for (_, crop), perm in zip(pairs, perms)]
            directions = [self._queue_direction(q, k) for q, k in zip(queries, keys)]
            self._enqueue(torch.cat(keys))
        else:
            keys = [self._keys(self.f_q, crop, perm) for (_, crop), perm in zip(pairs, perms)]
            directions = [self._batch_direction(q, k) for q, k in zip(queries, keys)]
        rank_losses = [
            combine_directions(
                [F.cross_entropy(d.logits[self.rows_of(r)], d.labels[self.rows_of(r)]) for d in directions]
            )
            for r in range(self.world)
        ]
        return Step(directions, rank_losses, torch.stack(rank_losses).mean())

    def _keys(self, net: nn.Module, crops: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        shuffled = crops[perm]  # rank r is sent rows perm[r * batch : (r + 1) * batch] of the gathered batch
        keys_shuffled = encode(net, shuffled, self.calls)  # each rank (split) normalises what it was sent
        return keys_shuffled[torch.argsort(perm)]  # unshuffle: row i is sample i's key again

    def _queue_direction(self, q: torch.Tensor, k: torch.Tensor) -> Direction:
        positive = torch.einsum("nc,nc->n", q, k).unsqueeze(1)
        negative = torch.einsum("nc,ck->nk", q, self.queue.clone())
        logits = torch.cat([positive, negative], dim=1) / self.temperature
        return Direction(q, k, logits, torch.zeros(len(q), dtype=torch.long))

    def _batch_direction(self, q: torch.Tensor, k: torch.Tensor) -> Direction:
        logits = q @ k.T / self.temperature  # sample i's positive is key i, the rest of the global batch negatives
        return Direction(q, k, logits, torch.arange(len(q)))

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        size = self.queue.shape[1]
        assert size % len(keys) == 0
        self.queue[:, self.ptr : self.ptr + len(keys)] = keys.T
        self.ptr = (self.ptr + len(keys)) % size

    @property
    def queue_rows(self) -> torch.Tensor:
        """The queue as rows ``[K, dim]``."""
        return self.queue.T

    @torch.no_grad()
    def sgd_step(self, lr: float) -> None:
        """Plain SGD on the query encoder with the gradients of the last backward, which it then clears."""
        for p in self.f_q.parameters():
            p.sub_(lr * p.grad)
            p.grad = None
