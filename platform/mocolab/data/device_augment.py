"""``data.pipeline=device``: MoCo's two-crop recipes as batched tensor operations on the worker's device.

The same recipes as :mod:`mocolab.data.augment` (``moco_v1``, ``moco_v2``, ``none``), with the same parameters
(:class:`DeviceRecipe`, built from the name), run on a batch of decoded uint8 images ``[3, H, W]`` of any sizes:

- the crop boxes of RandomResizedCrop are drawn for the whole batch at once (:func:`sample_crop_boxes`:
  torchvision's / albumentations' rule, 10 tries then a centre crop), each image is cut and resized to
  ``image_size`` (bilinear, antialiased) and the crops are stacked: images of different sizes need no padding;
- colour jitter, grayscale, Gaussian blur and the flip are kornia's augmentation modules on the stacked batch,
  every sample with its own random parameters (``same_on_batch=False``). kornia's ``ColorJitter`` is the one with
  torchvision's semantics (factors uniform in ``[1 - x, 1 + x]``, hue in ``[-h, h]``, the four in a random order),
  which albumentations' ``ColorJitter`` follows too; kornia's ``ColorJiggle`` is its older variant, not used;
- the result is normalised (:data:`~mocolab.data.augment.NORMALIZE`) on the device.

Every random draw comes from torch's global RNG (kornia draws its parameters there too), so a run seeded by
``runtime.seed_everything`` and restored from a checkpoint's RNG state replays the same views.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mocolab.data.augment import NORMALIZE, blur_kernel

CROP_TRIES = 10  # torchvision's and albumentations' RandomResizedCrop


@dataclass(frozen=True)
class DeviceRecipe:
    """The parameters of a two-crop recipe (``jitter``: brightness, contrast, saturation, hue). ``gray_first``:
    v1 applies grayscale before the jitter, v2 after it. ``crop=False``: resize the whole image (``none``)."""

    crop: bool = True
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    gray_first: bool = False
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    flip_p: float = 0.5


RECIPES = {
    "moco_v1": DeviceRecipe(jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, gray_first=True, blur_p=0.0),
    "moco_v2": DeviceRecipe(),
    "none": DeviceRecipe(crop=False, jitter_p=0.0, gray_p=0.0, blur_p=0.0, flip_p=0.0),
}
"""``data.augment`` name -> its parameters (the same as :mod:`mocolab.data.augment`'s albumentations ops)."""


def recipe(augment) -> DeviceRecipe:
    """The :class:`DeviceRecipe` of ``data.augment``; ValueError for a custom op list (not mapped to kornia)."""
    if not isinstance(augment, str) or augment not in RECIPES:
        raise ValueError(
            f"data.pipeline=device runs the named recipes {', '.join(RECIPES)} only, not data.augment={augment!r}: "
            "use one of them, or data.pipeline=cpu for a custom list of albumentations ops"
        )
    return RECIPES[augment]


def sample_crop_boxes(
    heights: torch.Tensor, widths: torch.Tensor, scale: Sequence[float], ratio: Sequence[float]
) -> torch.Tensor:
    """RandomResizedCrop boxes ``[N, 4]`` (top, left, height, width; int64) for images of ``heights`` x ``widths``:
    area fraction uniform in ``scale``, log aspect ratio uniform in ``log(ratio)``, the first of
    :data:`CROP_TRIES` draws that fits, else the whole image clamped to ``ratio`` (torchvision's rule).
    Drawn from torch's global RNG on the CPU, for all images at once."""
    n = heights.numel()
    h, w = heights.double().view(n, 1), widths.double().view(n, 1)
    area = h * w * torch.empty(n, CROP_TRIES, dtype=torch.float64).uniform_(*scale)
    log_ratio = torch.empty(n, CROP_TRIES, dtype=torch.float64).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_ratio)
    cw = torch.round(torch.sqrt(area * aspect))
    ch = torch.round(torch.sqrt(area / aspect))
    fits = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
    first = torch.argmax(fits.int(), dim=1, keepdim=True)
    found = fits.any(dim=1)
    cw, ch = cw.gather(1, first).view(n), ch.gather(1, first).view(n)
    # the fallback: the whole image, its aspect clamped to ratio
    h1, w1 = h.view(n), w.view(n)
    in_ratio = w1 / h1
    fb_w = torch.where(in_ratio < ratio[0], w1, torch.where(in_ratio > ratio[1], torch.round(h1 * ratio[1]), w1))
    fb_h = torch.where(in_ratio < ratio[0], torch.round(w1 / ratio[0]), h1)
    cw, ch = torch.where(found, cw, fb_w), torch.where(found, ch, fb_h)
    u = torch.rand(n, 2, dtype=torch.float64)
    top = torch.where(found, torch.floor(u[:, 0] * (h1 - ch + 1)), torch.div(h1 - ch, 2, rounding_mode="floor"))
    left = torch.where(found, torch.floor(u[:, 1] * (w1 - cw + 1)), torch.div(w1 - cw, 2, rounding_mode="floor"))
    return torch.stack([top, left, ch, cw], dim=1).long()


def resized_crops(images: Sequence[torch.Tensor], boxes: torch.Tensor | None, size: int) -> torch.Tensor:
    """Cut ``boxes`` (None: the whole image) out of uint8 images ``[3, H, W]`` and resize each to ``size`` x
    ``size`` (bilinear, antialiased); returns a float batch ``[N, 3, size, size]`` in [0, 1]."""
    crops = []
    for i, image in enumerate(images):
        if boxes is not None:
            top, left, height, width = boxes[i].tolist()
            image = image[:, top : top + height, left : left + width]
        crop = image.unsqueeze(0).float()
        if crop.shape[-2:] != (size, size):
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        crops.append(crop)
    return (torch.cat(crops) / 255.0).clamp_(0.0, 1.0)


class DeviceTwoCrop(torch.nn.Module):
    """Two independent views of every image of a batch: decoded uint8 images ``[3, H, W]`` (any sizes, on the
    device) -> ``(view_q, view_k)`` normalised float ``[N, 3, S, S]``."""

    def __init__(self, params: DeviceRecipe, image_size: int):
        super().__init__()
        import kornia.augmentation as K

        self.params, self.image_size = params, image_size
        b, c, s, h = params.jitter
        jitter = K.ColorJitter(b, c, s, h, p=params.jitter_p, same_on_batch=False)
        gray = K.RandomGrayscale(p=params.gray_p, same_on_batch=False)
        k = blur_kernel(image_size)
        blur = K.RandomGaussianBlur((k, k), params.blur_sigma, p=params.blur_p, same_on_batch=False)
        flip = K.RandomHorizontalFlip(p=params.flip_p, same_on_batch=False)
        ops = [gray, jitter] if params.gray_first else [jitter, gray]
        self.ops = torch.nn.ModuleList(op for op in [*ops, blur, flip] if op.p > 0)
        self.register_buffer("mean", torch.tensor(NORMALIZE["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(NORMALIZE["std"]).view(1, 3, 1, 1), persistent=False)

    def view(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """One augmented view of every image, normalised."""
        boxes = None
        if self.params.crop:
            heights = torch.tensor([im.shape[-2] for im in images])
            widths = torch.tensor([im.shape[-1] for im in images])
            boxes = sample_crop_boxes(heights, widths, self.params.scale, self.params.ratio)
        batch = resized_crops(images, boxes, self.image_size)
        for op in self.ops:
            batch = op(batch)
        return (batch - self.mean.to(batch.device)) / self.std.to(batch.device)

    @torch.no_grad()
    def forward(self, images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view(images), self.view(images)


def device_two_crop(augment, image_size: int) -> DeviceTwoCrop:
    """The device two-crop transform of the named recipe ``data.augment`` at ``data.image_size``."""
    return DeviceTwoCrop(recipe(augment), image_size)
