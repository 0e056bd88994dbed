"""LARS as MoCo v3 uses it (the official code's ``moco/optimizer.py``), with its exclusions.

For a parameter of more than one dimension: ``d = grad + wd * p``, scaled by the trust ratio
``eta * ||p|| / ||d||`` (1 where either norm is 0). Biases and norm parameters (one dimension or less) get neither
weight decay nor the trust ratio. Then ``mu = momentum * mu + d`` and ``p -= lr * mu``. (timm's ``Lars`` divides by
``||grad|| + wd ||p||`` instead of ``||grad + wd p||`` and skips the ratio without weight decay: not the same.)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class LARS(torch.optim.Optimizer):
    """v3's LARS; ``trust_coefficient`` is the ``eta`` above."""

    def __init__(
        self,
        params: Iterable,
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        super().__init__(
            params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    p_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    ratio = group["trust_coefficient"] * p_norm / d_norm
                    d = d * torch.where((p_norm > 0) & (d_norm > 0), ratio, torch.ones_like(ratio))
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(d)
                p.add_(state["mu"], alpha=-group["lr"])
        return loss
