"""The fast CPU two-crop: MoCo's recipes from encoded bytes to uint8 views, with the reference's distribution.

:class:`FastTwoCrop` runs an op list made only of RandomResizedCrop (first), ColorJitter, ToGray, GaussianBlur and
HorizontalFlip, which covers ``moco_v1`` and ``moco_v2``. It reads every parameter from the albumentations ops that
:mod:`mocolab.data.augment` builds (one source of truth) and applies albumentations' own kernels, so a view has the
reference's distribution; what it saves is the work around them:

- a JPEG is decoded by libjpeg-turbo (simplejpeg) straight into a numpy array, the same pixels as PIL's decoder
  without PIL's two copies (``convert`` and ``tobytes``). Not done: decoding at a reduced DCT scale where both crops
  allow it. It low-passes like an area filter where the reference's bilinear resize aliases, so the views' sharpness
  distribution changes (tests/data/test_data_augment_distribution.py detects it), and at 224 px it never applies to
  photos under ~450 px a side (ImageNet's typical size) anyway;
- the views stay uint8 (a quarter of the float bytes through collate and the loader's shared memory), made
  ``[S, S, 3]`` and handed on as ``[3, S, S]`` views of that memory, which
  :func:`mocolab.data.datasets.collate_views` stacks without transposing them; the step normalises them once on its
  device (:func:`mocolab.data.normalize.normalize_views`);
- GaussianBlur's 23-tap kernel (at 224 px) is cut to +-4 sigma (:func:`gaussian_taps`; at most one grey level off);
- all random draws of an image come from one torch draw (seeded like the reference, per loader worker), and no
  Compose, validation or per-op dict passing runs per view;
- a view already grey (``moco_v1`` greys before its jitter) skips the jitter's saturation and hue, which leave a grey
  pixel as it is (the round trip through HSV and the blend with its own grey are exact on all 256 levels).

For files other than the JPEGs simplejpeg reads (PNG, CMYK, corrupt ones) :meth:`FastTwoCrop.from_encoded` returns
None: the caller decodes them with the reference decoder (:func:`mocolab.data.images.decode_rgb`, with its modes
and its errors) and calls the transform on the array.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np
import simplejpeg
import torch
from albumentations.augmentations.blur import functional as fblur
from albumentations.augmentations.pixel import functional as fpixel

CROP_TRIES = 10  # RandomResizedCrop's attempts before its central fallback
_JITTER = (
    fpixel.adjust_brightness_torchvision,
    fpixel.adjust_contrast_torchvision,
    fpixel.adjust_saturation_torchvision,
    fpixel.adjust_hue_torchvision,
)
_IDENTITY_ON_GREY = (2, 3)  # saturation, hue: a grey view's pixels unchanged (moco_v1 greys before its jitter)
SUPPORTED_OPS = (A.RandomResizedCrop, A.ColorJitter, A.ToGray, A.GaussianBlur, A.HorizontalFlip)


@dataclass(frozen=True)
class CropBox:
    """A crop ``[y0:y1, x0:x1]`` of an image of ``height x width`` (RandomResizedCrop's ``crop_coords``)."""

    x0: int
    y0: int
    x1: int
    y1: int


def sample_crop(height: int, width: int, scale, ratio, u: np.ndarray) -> CropBox:
    """RandomResizedCrop's box (albumentations 2.0's rule) from ``2 * CROP_TRIES + 2`` uniforms ``u`` in [0, 1):
    up to 10 tries of an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``, else the central
    crop of the image clipped to ``ratio``."""
    area = height * width
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for t in range(CROP_TRIES):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[2 * t])
        aspect = math.exp(lo + (hi - lo) * u[2 * t + 1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            y0 = int((height - h + 1) * u[-2])
            x0 = int((width - w + 1) * u[-1])
            return CropBox(x0, y0, x0 + w, y0 + h)
    w, h = width, height
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    y0, x0 = (height - h) // 2, (width - w) // 2
    return CropBox(x0, y0, x0 + w, y0 + h)


def gaussian_taps(sigma: float, ksize: int) -> np.ndarray:
    """GaussianBlur's 1-D kernel (albumentations' own) cut to its central ``2 * ceil(4 sigma) + 1`` taps and
    renormalised: the cut-off weight is under 1e-4 of the whole, so a blurred uint8 view differs from the full
    kernel's by at most one grey level in under 0.1 % of its pixels, for up to 5x fewer taps at small sigmas."""
    kernel = fblur.create_gaussian_kernel_1d(sigma, ksize)
    cut = max(0, ksize // 2 - math.ceil(4 * sigma))
    if cut == 0:
        return kernel
    kept = kernel[cut : ksize - cut]
    return kept / kept.sum()


class FastTwoCrop:
    """Two views of one image as uint8 ``[3, S, S]`` tensors, the ops of ``ops`` (see :func:`fast_ops`)."""

    uint8 = True

    def __init__(self, ops: list, image_size: int):
        self.ops, self.size = ops, image_size
        self.crop = ops[0]
        # uniforms per view: the crop's, then each op's at most (apply; jitter: 4 factors, 4 order keys; blur: 2)
        self.draws = (
            2 * CROP_TRIES
            + 2
            + sum(9 if isinstance(op, A.ColorJitter) else 3 if isinstance(op, A.GaussianBlur) else 1 for op in ops[1:])
        )

    def _crop_boxes(self, height: int, width: int, u: np.ndarray) -> list[CropBox]:
        n = 2 * CROP_TRIES + 2
        return [sample_crop(height, width, self.crop.scale, self.crop.ratio, u[v, :n]) for v in range(2)]

    def _view(self, image: np.ndarray, box: CropBox, u: np.ndarray) -> torch.Tensor:
        view = cv2.resize(
            image[box.y0 : box.y1, box.x0 : box.x1], (self.size, self.size), interpolation=cv2.INTER_LINEAR
        )
        k = 2 * CROP_TRIES + 2
        grey = False  # R = G = B, after ToGray: saturation and hue leave every grey pixel as it is (exactly)
        for op in self.ops[1:]:
            if u[k] >= op.p:
                k += 1
                continue
            if isinstance(op, A.ColorJitter):
                factors = [
                    lo + (hi - lo) * x
                    for (lo, hi), x in zip((op.brightness, op.contrast, op.saturation, op.hue), u[k + 1 : k + 5])
                ]
                for i in np.argsort(u[k + 5 : k + 9]):
                    if not (grey and i in _IDENTITY_ON_GREY):
                        view = _JITTER[i](view, factors[i])
                k += 9
            elif isinstance(op, A.ToGray):
                view = fpixel.to_gray(view, op.num_output_channels, op.method)
                grey = True
                k += 1
            elif isinstance(op, A.GaussianBlur):
                sigma = op.sigma_limit[0] + (op.sigma_limit[1] - op.sigma_limit[0]) * u[k + 1]
                ksize = op.blur_limit[0] + int(u[k + 2] * (op.blur_limit[1] - op.blur_limit[0] + 1))
                view = fpixel.separable_convolve(view, kernel=gaussian_taps(sigma, ksize))
                k += 3
            else:  # HorizontalFlip
                view = cv2.flip(view, 1)
                k += 1
        return torch.from_numpy(np.ascontiguousarray(view)).permute(2, 0, 1)

    def _uniforms(self) -> np.ndarray:
        # From torch's RNG, as the reference: DataLoader seeds it per worker and checkpoints restore it.
        return torch.rand(2, self.draws, dtype=torch.float64).numpy()

    def __call__(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views of a decoded uint8 RGB ``[H, W, 3]`` image."""
        u = self._uniforms()
        boxes = self._crop_boxes(image.shape[0], image.shape[1], u)
        return self._view(image, boxes[0], u[0]), self._view(image, boxes[1], u[1])

    def from_encoded(self, data: bytes) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Two views of an encoded image file's bytes; None for a file this decoder does not read (decode it with the
        reference decoder and call the transform)."""
        if not _decodable_jpeg(data):
            return None
        try:
            image = simplejpeg.decode_jpeg(data, colorspace="RGB")
        except ValueError:  # a JPEG libjpeg-turbo refuses (truncated, corrupt): the reference decoder decides
            return None
        return self(image)


def _decodable_jpeg(data: bytes) -> bool:
    """Whether ``data`` is a JPEG that simplejpeg decodes to RGB as PIL would (not CMYK/YCCK)."""
    if not simplejpeg.is_jpeg(data):
        return False
    try:
        return simplejpeg.decode_jpeg_header(data)[2] in ("RGB", "YCbCr", "Gray")
    except ValueError:
        return False


def fast_ops(ops: list) -> list | None:
    """``ops`` if :class:`FastTwoCrop` can run them (a RandomResizedCrop first, then only supported ops, all with
    their default interpolation and methods), else None."""
    if not ops or not isinstance(ops[0], A.RandomResizedCrop) or ops[0].p != 1:
        return None
    crop = ops[0]
    if crop.interpolation != cv2.INTER_LINEAR or crop.area_for_downscale is not None:
        return None
    rest = ops[1:]
    if not all(type(op) in SUPPORTED_OPS[1:] for op in rest):
        return None
    if any(
        isinstance(op, A.ToGray) and (op.method != "weighted_average" or op.num_output_channels != 3) for op in rest
    ):
        return None
    return ops
