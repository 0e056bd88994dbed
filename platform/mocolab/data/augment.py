"""albumentations pipelines: MoCo's two-crop policies, custom op lists from config, the eval transform.

Every albumentations pipeline takes a numpy HWC uint8 RGB image and returns a normalised float CHW tensor of
``image_size x image_size``; this is the reference (and the bench's baseline row). For training,
:func:`two_crop_transform` runs op lists that :mod:`mocolab.data.fastcrop` supports (``moco_v1``, ``moco_v2``) on
that fast path instead, whose views are uint8: :func:`mocolab.data.normalize.normalize_views` normalises a batch
once, on the step's device, and passes already-normalised float batches (any other op list) through. Policies are
named (``moco_v1``, ``moco_v2``, ``none``) or given as a list of albumentations ops in ``data.augment``;
``check_policy`` builds and runs a pipeline once so that a bad one is refused when the config loads.
"""

from __future__ import annotations

import difflib
import inspect
import random
import warnings
from typing import Any

import albumentations as A
import numpy as np
import torch
from albumentations.core.transforms_interface import DualTransform, ImageOnlyTransform
from albumentations.pytorch import ToTensorV2

from mocolab.data.fastcrop import FastTwoCrop, fast_ops
from mocolab.data.normalize import NORMALIZE

AugmentSpec = str | list[dict[str, Any]]

# Ops a custom list may name: albumentations' 2D image transforms (3D and box-only ones excluded).
VALID_OPS = sorted(
    name
    for name in dir(A)
    if inspect.isclass(cls := getattr(A, name))
    and issubclass(cls, (ImageOnlyTransform, DualTransform))
    and cls not in (ImageOnlyTransform, DualTransform)
    and "3D" not in name
)
_COMMON_OPS = ("RandomResizedCrop", "ColorJitter", "ToGray", "GaussianBlur", "HorizontalFlip", "Resize")


def _normalize_to_tensor() -> list:
    return [A.Normalize(mean=NORMALIZE["mean"], std=NORMALIZE["std"]), ToTensorV2()]


def blur_kernel(image_size: int) -> int:
    """MoCo v2's Gaussian kernel (23 px at 224, i.e. ~10 % of the side), odd and at least 3."""
    k = max(3, int(round(0.1 * image_size)))
    return k if k % 2 else k + 1


def _moco_v1(size: int) -> list:
    """MoCo v1 (``main_moco.py``): crop (0.2, 1), grayscale 0.2, jitter 0.4 x 4, flip."""
    return [
        A.RandomResizedCrop(size=(size, size), scale=(0.2, 1.0)),
        A.ToGray(p=0.2),
        A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.4, p=1.0),
        A.HorizontalFlip(p=0.5),
    ]


def _moco_v2(size: int) -> list:
    """MoCo v2 (``--aug-plus``): crop (0.2, 1), jitter p=0.8, grayscale 0.2, blur p=0.5, flip."""
    k = blur_kernel(size)
    return [
        A.RandomResizedCrop(size=(size, size), scale=(0.2, 1.0)),
        A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8),
        A.ToGray(p=0.2),
        A.GaussianBlur(blur_limit=(k, k), sigma_limit=(0.1, 2.0), p=0.5),
        A.HorizontalFlip(p=0.5),
    ]


def _no_augment(size: int) -> list:
    return [A.Resize(height=size, width=size)]


_NAMED = {"moco_v1": _moco_v1, "moco_v2": _moco_v2, "none": _no_augment}


def _size_defaults(cls: type, size: int) -> dict[str, Any]:
    """Size arguments of an op that take their value from ``data.image_size`` when omitted."""
    params = inspect.signature(cls.__init__).parameters
    defaults: dict[str, Any] = {}
    if "size" in params and params["size"].default is inspect.Parameter.empty:
        defaults["size"] = (size, size)
    for key in ("height", "width"):
        if key in params and params[key].default is inspect.Parameter.empty:
            defaults[key] = size
    return defaults


def _custom_op(index: int, spec: Any, size: int):
    where = f"data.augment[{index}]"
    if not isinstance(spec, dict) or "op" not in spec:
        raise ValueError(
            f"{where}: each entry must be a mapping with an 'op' key, e.g. {{op: HorizontalFlip, p: 0.5}}; got {spec!r}"
        )
    params = dict(spec)
    name = params.pop("op")
    if name not in VALID_OPS:
        close = difflib.get_close_matches(str(name), VALID_OPS, n=3, cutoff=0.5)
        hint = close or list(_COMMON_OPS)
        raise ValueError(
            f"{where}: unknown albumentations op {name!r}; use an albumentations transform name, "
            f"e.g. {', '.join(hint)} (albumentations {A.__version__})"
        )
    cls = getattr(A, name)
    kwargs = {**_size_defaults(cls, size), **params}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(**kwargs, strict=True)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: op {name} rejects its parameters {params}: {_error_text(err)}") from None


def _error_text(err: Exception) -> str:
    """albumentations' (pydantic) message on one line, without its documentation links."""
    lines = (line.strip() for line in str(err).splitlines())
    return " ".join(line for line in lines if line and not line.startswith("For further information"))


def _ops(augment: AugmentSpec, size: int) -> list:
    if isinstance(augment, str):
        if augment not in _NAMED:
            raise ValueError(
                f"data.augment={augment!r} is not a named policy; use one of {', '.join(_NAMED)} "
                "or a list of ops like [{op: RandomResizedCrop, scale: [0.2, 1.0]}, {op: HorizontalFlip}]"
            )
        return _NAMED[augment](size)
    if not isinstance(augment, list) or not augment:
        raise ValueError(f"data.augment must be a policy name or a non-empty list of ops; got {augment!r}")
    ops = [_custom_op(i, spec, size) for i, spec in enumerate(augment)]
    names = [type(op).__name__ for op in ops]
    if "ToTensorV2" in names or "Normalize" in names:
        raise ValueError("data.augment: leave out Normalize and ToTensorV2; mocolab appends them to every policy")
    return ops


def build_pipeline(augment: AugmentSpec, image_size: int) -> A.Compose:
    """The albumentations pipeline of a policy: its ops, then Normalize(NORMALIZE) and ToTensorV2."""
    return A.Compose(_ops(augment, image_size) + _normalize_to_tensor())


def check_policy(augment: AugmentSpec, image_size: int) -> None:
    """Build the policy and run it once on a dummy image; raise ValueError naming ``data.augment``.

    The dummy image has a size other than ``image_size``, so a custom list that does not fix the
    output size (no crop or resize) is refused: batches need equal sizes.
    """
    pipeline = build_pipeline(augment, image_size)
    dummy = np.random.default_rng(0).integers(0, 256, (image_size + 9, image_size + 5, 3), dtype=np.uint8)
    try:
        out = pipeline(image=dummy)["image"]
    except Exception as err:  # any failure of a user-given op is a config error
        raise ValueError(f"data.augment={augment!r} fails on an RGB image: {type(err).__name__}: {err}") from None
    if tuple(out.shape) != (3, image_size, image_size):
        raise ValueError(
            f"data.augment={augment!r} gives images of shape {tuple(out.shape)}, not (3, {image_size}, {image_size}) "
            "(data.image_size); add a RandomResizedCrop or Resize op (their size defaults to data.image_size)"
        )


class TwoCropTransform:
    """Two independent augmentations of one image: the query and key views of MoCo."""

    def __init__(self, augment: AugmentSpec, image_size: int):
        self.pipeline = build_pipeline(augment, image_size)

    def __call__(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # albumentations keeps its own RNG; draw it from torch's, which DataLoader seeds per worker and
        # checkpoints restore: loader workers differ, and a resumed run replays an uninterrupted one.
        seed = int(torch.randint(2**31 - 1, ()))
        self.pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))
        return self.pipeline(image=image)["image"], self.pipeline(image=image)["image"]


def two_crop_transform(augment: AugmentSpec, image_size: int) -> TwoCropTransform | FastTwoCrop:
    """A callable: numpy HWC uint8 RGB image -> (view_q, view_k) tensors [3, S, S]: uint8 from the fast path
    (:class:`~mocolab.data.fastcrop.FastTwoCrop`) where it runs the op list, else normalised float."""
    ops = fast_ops(_ops(augment, image_size))
    return FastTwoCrop(ops, image_size) if ops is not None else TwoCropTransform(augment, image_size)


class EvalTransform:
    """Deterministic transform for evaluation: numpy HWC uint8 RGB -> float tensor [3, S, S]."""

    def __init__(self, image_size: int, crop_fraction: float):
        resize = max(image_size, int(round(image_size / crop_fraction)))
        self.pipeline = A.Compose(
            [A.SmallestMaxSize(max_size=resize), A.CenterCrop(height=image_size, width=image_size)]
            + _normalize_to_tensor()
        )

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.pipeline(image=image)["image"]


def eval_transform(image_size: int, crop_fraction: float | None = None) -> EvalTransform:
    """Resize the short side to ``image_size / crop_fraction``, center-crop ``image_size``, normalise.

    ``crop_fraction`` defaults to 0.875 (ImageNet's 256 -> 224) from 128 px up and to 1.0 for small
    images (CIFAR, digits: the whole image, as in the MoCo CIFAR demo)."""
    if crop_fraction is None:
        crop_fraction = 0.875 if image_size >= 128 else 1.0
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction={crop_fraction} must be in (0, 1]")
    return EvalTransform(image_size, crop_fraction)
