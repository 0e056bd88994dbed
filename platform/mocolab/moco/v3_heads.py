"""MoCo v3's projector and predictor MLPs (the official code's ``_build_mlp``), the per-step momentum schedule.

Layers: ``Linear(no bias) -> BN1d -> ReLU`` repeated, then ``Linear(no bias)`` and, with ``last_bn``, a BN1d without
affine parameters. Projector: 3 layers for a ViT, 2 for a ResNet (or any other backbone), last BN on; predictor:
2 layers, its last BN on for a ViT and off for a ResNet. Hidden width ``moco.mlp_dim``, output ``moco.dim``.
"""

from __future__ import annotations

import math

from torch import nn


def build_mlp(num_layers: int, input_dim: int, hidden_dim: int, output_dim: int, last_bn: bool = True) -> nn.Sequential:
    """The v3 MLP of ``num_layers`` linear layers (see the module docstring)."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        in_dim = input_dim if i == 0 else hidden_dim
        out_dim = output_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(in_dim, out_dim, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(out_dim), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


def v3_heads(feat_dim: int, hidden_dim: int, dim: int, vit: bool) -> tuple[nn.Sequential, nn.Sequential]:
    """``(projector, predictor)`` of MoCo v3 for a backbone of ``feat_dim`` features (``vit``: ViT variants)."""
    projector = build_mlp(3 if vit else 2, feat_dim, hidden_dim, dim)
    predictor = build_mlp(2, dim, hidden_dim, dim, last_bn=vit)
    return projector, predictor


def cosine_momentum(step: int, steps_per_epoch: int, epochs: int, base: float) -> float:
    """The v3 code's ``adjust_moco_momentum`` at iteration ``step`` (0-based): ``1 - (1 + cos(pi e / E)) / 2 *
    (1 - base)`` with ``e = step / steps_per_epoch`` the fractional epoch; ``base`` at the start, 1 at the end."""
    epoch = step / steps_per_epoch
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - base)
