"""Backbones (``model.arch``): a small CPU CNN, torchvision ResNets and any timm model (``timm:<name>``, see
``moco/timm_backbones.py``), returning pooled features ``[B, feat_dim]``."""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import nn

from mocolab.moco.norm import convert_batchnorm

RESNETS = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
}
SMALL_CNN_WIDTHS = (32, 64, 128, 256)
TIMM_PREFIX = "timm:"


class SmallCNN(nn.Module):
    """Four 3x3 conv + BN + ReLU blocks (widths 32-64-128-256, the last three with stride 2) and global
    average pooling: a backbone light enough for MoCo on 24-32 px images on a couple of CPU cores."""

    def __init__(self, widths: tuple[int, ...] = SMALL_CNN_WIDTHS) -> None:
        super().__init__()
        blocks, in_channels = [], 3
        for i, width in enumerate(widths):
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(in_channels, width, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                )
            )
            in_channels = width
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


def _resnet(arch: str, cifar_stem: bool) -> tuple[nn.Module, int]:
    net = RESNETS[arch]()
    if cifar_stem:  # CIFAR variant: 3x3 stride-1 first conv, no max-pool (same key names)
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feat_dim


def resolve_channels_last(model_cfg, use_gpu: bool) -> bool:
    """``model.channels_last``, whose default (None) means: on for GPU runs, off on CPU."""
    return use_gpu if model_cfg.channels_last is None else bool(model_cfg.channels_last)


def make_backbone(
    arch: str,
    cifar_stem: bool = False,
    bn: str = "plain",
    bn_splits: int = 1,
    channels_last: bool = False,
    use_gpu: bool = False,
    timm_options: dict[str, Any] | None = None,
) -> tuple[nn.Module, int]:
    """The backbone ``arch`` with BN layers per ``bn`` / ``bn_splits`` (see norm.convert_batchnorm) in the given
    memory format; returns ``(module mapping [B, 3, H, W] -> [B, feat_dim], feat_dim)``. ``timm_options``: the
    keyword arguments of :func:`mocolab.moco.timm_backbones.make_timm_backbone` for a ``timm:<name>`` arch."""
    if arch.startswith(TIMM_PREFIX):
        from mocolab.moco.timm_backbones import make_timm_backbone

        net, feat_dim = make_timm_backbone(arch.removeprefix(TIMM_PREFIX), **(timm_options or {}))
    elif arch == "small_cnn":
        if cifar_stem:
            raise ValueError("model.cifar_stem applies to ResNets only; set it false for model.arch=small_cnn")
        net = SmallCNN()
        feat_dim = net.out_features
    elif arch in RESNETS:
        net, feat_dim = _resnet(arch, cifar_stem)
    else:
        raise ValueError(f"model.arch={arch!r} is not one of small_cnn, {', '.join(RESNETS)}, {TIMM_PREFIX}<name>")
    net = convert_batchnorm(net, bn, bn_splits, use_gpu)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net, feat_dim


def timm_options(model_cfg, image_size: int) -> dict[str, Any]:
    """The ``make_timm_backbone`` keyword arguments of a ``model`` config section for images of ``image_size``."""
    return {
        "kwargs": dict(model_cfg.timm_kwargs),
        "image_size": image_size,
        "sincos_pos": model_cfg.vit_sincos_pos,
        "freeze_patch_proj": model_cfg.vit_freeze_patch_proj,
    }


def build_backbone(model_cfg, use_gpu: bool = False, image_size: int = 224) -> tuple[nn.Module, int]:
    """:func:`make_backbone` for a ``model`` config section (``model.channels_last`` resolved for the device;
    ``image_size`` sets a timm ViT's ``img_size``)."""
    return make_backbone(
        model_cfg.arch,
        model_cfg.cifar_stem,
        model_cfg.bn,
        model_cfg.bn_splits,
        resolve_channels_last(model_cfg, use_gpu),
        use_gpu,
        timm_options(model_cfg, image_size),
    )


def backbone_state_dict(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's weights and BN statistics on the CPU, keyed as torchvision names them
    (``conv1.weight``, ``layer1.0.bn1.running_mean``; no ``fc.*``), so that ``torchvision.models.resnet50()``
    loads them with ``strict=False`` missing only ``fc.weight`` / ``fc.bias``. A ``torch.compile`` wrapper
    prefix (``_orig_mod.``) is dropped."""
    return {
        key.removeprefix("_orig_mod."): value.detach().cpu().clone()
        for key, value in backbone.state_dict().items()
        if not key.startswith("fc.")
    }
