"""Backbones from timm (``model.arch: timm:<name>``), with MoCo v3's two ViT options.

``timm.create_model(name, num_classes=0, **kwargs)`` returns pooled features (a ViT: its class token after the
final norm); the feature dimension is the model's ``num_features``. A ViT gets ``img_size`` from
``data.image_size``, and optionally (``model.vit_sincos_pos``) the fixed 2-D sin-cos position embedding of the
v3 code's ``vits.py`` and (``model.vit_freeze_patch_proj``, the v3 code's ``stop_grad_conv1``) a frozen random
patch projection. Not done here: the v3 code's own ViT weight init (xavier-uniform, Q/K/V separately); timm's
default init is used.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

PATCH_IN_NAME = re.compile(r"patch(\d+)")


def patch_size_from_name(name: str) -> int | None:
    """The patch size a timm ViT name states (``vit_tiny_patch16_224`` -> 16), None if it states none."""
    found = PATCH_IN_NAME.search(name)
    return int(found.group(1)) if found else None


def is_vit_name(name: str) -> bool:
    """Whether timm builds ``name`` as a VisionTransformer (by the module that registers it)."""
    import timm.models

    return timm.models.is_model_in_modules(name, ["vision_transformer"])


def check_timm_name(name: str, image_size: int, patch_size: int | None = None) -> None:
    """ValueError naming ``model.arch`` unless timm knows ``name``, and, for a ViT, unless ``data.image_size`` is a
    multiple of its patch size (``model.timm_kwargs.patch_size`` if given, else the one its name states)."""
    import timm

    if not timm.is_model(name):
        raise ValueError(
            f"model.arch=timm:{name}: timm {timm.__version__} has no model of that name "
            "(see timm.list_models(), e.g. timm:vit_tiny_patch16_224, timm:resnet18)"
        )
    patch = patch_size or (patch_size_from_name(name) if is_vit_name(name) else None)
    if patch and image_size % patch:
        raise ValueError(
            f"data.image_size={image_size} is not a multiple of the patch size {patch} of "
            f"model.arch=timm:{name}; use e.g. data.image_size={max(1, image_size // patch) * patch}"
        )


def sincos_2d_position_embedding(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """The v3 code's fixed position embedding ``[1, 1 + h * w, dim]``: a zero row for the class token, then per
    patch ``[sin(a w), cos(a w), sin(a h), cos(a h)]`` with ``a = temperature ** -(i / (dim / 4))``. As in the v3
    code, the grid is indexed ``(w, h)`` with ``w`` the slow index (``torch.meshgrid`` of ``(w, h)``)."""
    if dim % 4:
        raise ValueError(f"model.vit_sincos_pos needs an embedding dimension divisible by 4, got {dim}")
    h, w = grid
    grid_w, grid_h = torch.meshgrid(
        torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32), indexing="ij"
    )
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_w = grid_w.flatten()[:, None] * omega[None]
    out_h = grid_h.flatten()[:, None] * omega[None]
    patches = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), patches])[None]


def _apply_v3_vit_options(net: nn.Module, sincos_pos: bool, freeze_patch_proj: bool) -> None:
    if sincos_pos:
        tokens = net.patch_embed.num_patches + 1
        if net.num_prefix_tokens != 1 or net.pos_embed is None or net.pos_embed.shape[1] != tokens:
            raise ValueError(
                "model.vit_sincos_pos needs a ViT with one class token embedded with the patches; "
                "set model.vit_sincos_pos=false for this model"
            )
        table = sincos_2d_position_embedding(net.patch_embed.grid_size, net.embed_dim)
        net.pos_embed = nn.Parameter(table.to(net.pos_embed.dtype), requires_grad=False)
    if freeze_patch_proj:
        net.patch_embed.proj.requires_grad_(False)


def make_timm_backbone(
    name: str,
    kwargs: dict[str, Any] | None = None,
    image_size: int = 224,
    sincos_pos: bool = False,
    freeze_patch_proj: bool = False,
) -> tuple[nn.Module, int]:
    """``timm.create_model(name, num_classes=0, **creation_kwargs(...))`` with the v3 ViT options applied;
    returns ``(model, num_features)``. The options are ignored for models that are not ViTs."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    net = timm.create_model(name, **creation_kwargs(name, kwargs, image_size))
    if isinstance(net, VisionTransformer):
        _apply_v3_vit_options(net, sincos_pos, freeze_patch_proj)
    return net, net.num_features


def creation_kwargs(name: str, kwargs: dict[str, Any] | None, image_size: int) -> dict[str, Any]:
    """The arguments ``timm.create_model(name, **them)`` builds the backbone with (what ``mocolab export
    --format timm`` records): ``num_classes=0``, ``img_size`` for a ViT, then ``model.timm_kwargs``."""
    out: dict[str, Any] = {"num_classes": 0}
    if is_vit_name(name):
        out["img_size"] = image_size
    out.update(kwargs or {})
    return out


def is_vit(module: nn.Module) -> bool:
    """Whether ``module`` is a timm VisionTransformer (MoCo v3's 3-layer projector, class-token features)."""
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(module, VisionTransformer)
