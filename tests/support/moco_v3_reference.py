"""A plain MoCo v3, written from reading the official code (facebookresearch/moco-v3 at c349e6e: ``moco/builder.py``,
``main_moco.py``'s ``adjust_moco_momentum``, ``moco/optimizer.py``, ``vits.py``'s position embedding), to test
mocolab's v3 against. No mocolab import. Its ``.cuda()`` calls are gone, and it runs in ONE process on the global
batch (with several official ranks, SyncBatchNorm and the key all-gather make every rank see the global batch's
statistics and keys, and DDP averages the ranks' gradients: the gradient of the mean of the ranks' losses, which is
this model's loss on the global batch).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def build_mlp(num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
    """builder.py's ``_build_mlp``."""
    mlp = []
    for layer in range(num_layers):
        dim1 = input_dim if layer == 0 else mlp_dim
        dim2 = output_dim if layer == num_layers - 1 else mlp_dim
        mlp.append(nn.Linear(dim1, dim2, bias=False))
        if layer < num_layers - 1:
            mlp.append(nn.BatchNorm1d(dim2))
            mlp.append(nn.ReLU(inplace=True))
        elif last_bn:
            mlp.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*mlp)


class ReferenceMoCoV3(nn.Module):
    """builder.py's MoCo / MoCo_ResNet / MoCo_ViT around a given ``backbone`` (features ``[B, hidden_dim]``)."""

    def __init__(self, backbone, hidden_dim, dim, mlp_dim, T, vit):
        super().__init__()
        self.T = T
        projector = build_mlp(3 if vit else 2, hidden_dim, mlp_dim, dim)
        self.base_encoder = nn.Sequential(backbone, projector)
        self.momentum_encoder = copy.deepcopy(self.base_encoder)
        self.predictor = build_mlp(2, dim, mlp_dim, dim, last_bn=vit)
        for param_b, param_m in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters()):
            param_m.data.copy_(param_b.data)
            param_m.requires_grad = False

    @torch.no_grad()
    def _update_momentum_encoder(self, m):
        for param_b, param_m in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters()):
            param_m.data = param_m.data * m + param_b.data * (1.0 - m)

    def contrastive_loss(self, q, k):
        q = nn.functional.normalize(q, dim=1)
        k = nn.functional.normalize(k, dim=1)
        logits = torch.einsum("nc,mc->nm", [q, k]) / self.T  # one process: the gathered keys are k
        labels = torch.arange(logits.shape[0], dtype=torch.long)
        return nn.CrossEntropyLoss()(logits, labels) * (2 * self.T)

    def forward(self, x1, x2, m):
        q1 = self.predictor(self.base_encoder(x1))
        q2 = self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            self._update_momentum_encoder(m)
            k1 = self.momentum_encoder(x1)
            k2 = self.momentum_encoder(x2)
        return self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)


def adjust_moco_momentum(epoch, epochs, moco_m):
    """main_moco.py's momentum at fractional ``epoch``."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - moco_m)


class LARS(torch.optim.Optimizer):
    """optimizer.py's LARS."""

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(
            params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        )

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(
                        param_norm > 0.0,
                        torch.where(update_norm > 0, (g["trust_coefficient"] * param_norm / update_norm), one),
                        one,
                    )
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def sincos_position_embedding(grid_size, embed_dim, temperature=10000.0):
    """vits.py's ``build_2d_sincos_position_embedding`` table (class-token row first)."""
    h, w = grid_size
    grid_w = torch.arange(w, dtype=torch.float32)
    grid_h = torch.arange(h, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(grid_w, grid_h, indexing="ij")
    pos_dim = embed_dim // 4
    omega = torch.arange(pos_dim, dtype=torch.float32) / pos_dim
    omega = 1.0 / (temperature**omega)
    out_w = torch.einsum("m,d->md", [grid_w.flatten(), omega])
    out_h = torch.einsum("m,d->md", [grid_h.flatten(), omega])
    pos_emb = torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1)[None, :, :]
    pe_token = torch.zeros([1, 1, embed_dim], dtype=torch.float32)
    return torch.cat([pe_token, pos_emb], dim=1)
