"""The one normalisation of pretraining views: ImageNet statistics, applied where the batch is (torch only)."""

from __future__ import annotations

import torch

NORMALIZE = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
"""ImageNet channel statistics used by every pipeline (as in the MoCo code)."""

_MEAN_STD: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def normalize_views(images: torch.Tensor) -> torch.Tensor:
    """The model's input from a batch of views ``[N, 3, S, S]``: uint8 (the fast path's, in channels-last memory
    as :func:`mocolab.data.datasets.collate_views` stacks them) -> contiguous float32 normalised by ``NORMALIZE``, on
    the batch's device (the layout's transposition rides on the conversion); a float batch is already normalised and
    is returned as it is."""
    if images.dtype != torch.uint8:
        return images
    if images.device not in _MEAN_STD:
        mean, std = (torch.tensor(NORMALIZE[k], device=images.device).view(1, 3, 1, 1) for k in ("mean", "std"))
        _MEAN_STD[images.device] = (mean * 255, std * 255)
    mean, std = _MEAN_STD[images.device]
    return (images.to(torch.float32, memory_format=torch.contiguous_format) - mean) / std
