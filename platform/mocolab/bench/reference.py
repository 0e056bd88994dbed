"""The yardstick: a textbook MoCo step in plain PyTorch (fp32, no extras), written here from the paper.

It takes the same query encoder network as mocolab's model (a deep copy, so architectures and
weights match), keeps its own key encoder, ``[dim, K]`` queue and pointer, and does the paper's
Algorithm 1: query forward, per-parameter momentum update, key forward on a shuffled batch (when the model
shuffles its keys), InfoNCE
with ``K`` queued negatives, backward, SGD step, enqueue. Torch only (runs on the GPU check machine).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class ReferenceMoCo(nn.Module):
    """Textbook single-process MoCo (shuffle-BN emulated by shuffling the batch before the key encoder)."""

    def __init__(
        self, encoder_q: nn.Module, queue: torch.Tensor, momentum: float, temperature: float, shuffle: bool = True
    ):
        """``queue``: ``[K, dim]`` initial negatives (copied, stored as the paper's ``[dim, K]``); ``shuffle``:
        shuffle the key batch around the key encoder."""
        super().__init__()
        self.encoder_q = copy.deepcopy(encoder_q)
        self.encoder_k = copy.deepcopy(encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        self.m, self.t, self.shuffle = momentum, temperature, shuffle
        self.register_buffer("queue", queue.detach().T.clone())
        self.ptr = 0

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, perm: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of one step; updates the key encoder first and the queue after (as in Algorithm 1)."""
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            for p_k, p_q in zip(self.encoder_k.parameters(), self.encoder_q.parameters()):
                p_k.data = p_k.data * self.m + p_q.data * (1.0 - self.m)
            if self.shuffle:
                perm = torch.randperm(im_k.shape[0], device=im_k.device) if perm is None else perm
                k = F.normalize(self.encoder_k(im_k[perm]), dim=1)[torch.argsort(perm)]
            else:
                k = F.normalize(self.encoder_k(im_k), dim=1)
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())
        logits = torch.cat([l_pos, l_neg], dim=1) / self.t
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        loss = F.cross_entropy(logits, labels)
        with torch.no_grad():
            n = k.shape[0]
            self.queue[:, self.ptr : self.ptr + n] = k.T
            self.ptr = (self.ptr + n) % self.queue.shape[1]
        return loss


def reference_step_fn(
    model: ReferenceMoCo, lr: float, sgd_momentum: float, weight_decay: float
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A closure running one full training step (forward, backward, SGD step) and returning the loss."""
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=lr, momentum=sgd_momentum, weight_decay=weight_decay)

    def step(im_q: torch.Tensor, im_k: torch.Tensor) -> torch.Tensor:
        loss = model(im_q, im_k)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step
