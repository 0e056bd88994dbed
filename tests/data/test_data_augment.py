"""albumentations policies: shapes and dtypes, two different views, errors that name the bad op."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mocolab.data.augment import (
    NORMALIZE,
    blur_kernel,
    build_pipeline,
    check_policy,
    eval_transform,
    two_crop_transform,
)
from mocolab.data.normalize import normalize_views

CUSTOM = [{"op": "RandomResizedCrop", "scale": [0.2, 1.0]}, {"op": "HorizontalFlip", "p": 0.5}]


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("policy", ["moco_v1", "moco_v2", "none", CUSTOM])
@pytest.mark.parametrize("size", [32, 224])
def test_two_crop_shapes_and_dtype(policy, size):
    check_policy(policy, size)
    view_q, view_k = two_crop_transform(policy, size)(_image(size + 20, size + 3))
    fast = policy != "none"  # the named MoCo recipes and a list of fast-path ops: uint8 views, normalised later
    for view in (view_q, view_k):
        assert view.shape == (3, size, size)
        assert view.dtype == (torch.uint8 if fast else torch.float32)
        assert normalize_views(view[None]).dtype == torch.float32


@pytest.mark.parametrize("policy", ["moco_v1", "moco_v2", CUSTOM])
def test_two_views_differ(policy):
    view_q, view_k = two_crop_transform(policy, 32)(_image(48, 48))
    assert not torch.equal(view_q, view_k)


def test_none_policy_is_resize_and_normalise_only():
    image = _image(32, 32)
    view_q, view_k = two_crop_transform("none", 32)(image)
    assert torch.equal(view_q, view_k)
    mean = torch.tensor(NORMALIZE["mean"]).view(3, 1, 1)
    std = torch.tensor(NORMALIZE["std"]).view(3, 1, 1)
    expected = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - mean) / std
    assert torch.allclose(view_q, expected, atol=1e-5)


def test_moco_v2_blur_kernel_scales_with_image_size():
    assert blur_kernel(224) == 23
    assert blur_kernel(32) == 3
    ops = {type(t).__name__: t for t in build_pipeline("moco_v2", 224).transforms}
    assert tuple(ops["GaussianBlur"].blur_limit) == (23, 23)
    assert tuple(ops["RandomResizedCrop"].size) == (224, 224)


def test_custom_ops_take_size_from_image_size():
    crop = build_pipeline(CUSTOM, 40).transforms[0]
    assert tuple(crop.size) == (40, 40)
    assert tuple(crop.scale) == (0.2, 1.0)


def test_unknown_op_names_the_op_and_suggests_valid_ones():
    with pytest.raises(ValueError, match=r"data\.augment\[1\].*'RandomResizedCrp'.*RandomResizedCrop"):
        check_policy([{"op": "HorizontalFlip"}, {"op": "RandomResizedCrp"}], 32)


@pytest.mark.parametrize(
    "spec, text",
    [
        ({"op": "ColorJitter", "brightness": -1}, "brightness"),
        ({"op": "HorizontalFlip", "flip_prob": 0.5}, "flip_prob"),
        ({"op": "RandomResizedCrop", "scale": [1.5, 0.2]}, "scale"),
    ],
)
def test_bad_parameter_names_the_op_and_the_parameter(spec, text):
    with pytest.raises(ValueError, match=rf"data\.augment\[0\]: op {spec['op']}.*{text}"):
        check_policy([spec, {"op": "Resize"}], 32)


def test_unknown_policy_name_lists_the_policies():
    with pytest.raises(ValueError, match="moco_v1, moco_v2, none"):
        check_policy("moco_v3", 32)


def test_custom_list_that_does_not_fix_the_size_is_refused():
    with pytest.raises(ValueError, match="add a RandomResizedCrop or Resize"):
        check_policy([{"op": "HorizontalFlip"}], 32)


def test_entry_without_op_key_is_refused():
    with pytest.raises(ValueError, match=r"data\.augment\[0\].*'op' key"):
        check_policy([{"name": "HorizontalFlip"}], 32)


def test_eval_transform_center_crops_large_images_and_keeps_small_ones_whole():
    assert eval_transform(224)(_image(300, 400)).shape == (3, 224, 224)
    small = _image(32, 32)
    assert torch.equal(eval_transform(32)(small), two_crop_transform("none", 32)(small)[0])


def test_uint8_views_are_normalised_once_as_the_reference_normalises():
    image = _image(32, 32)
    reference = build_pipeline("none", 32)(image=image)["image"]
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None]
    assert torch.allclose(normalize_views(pixels)[0], reference, atol=1e-5)
    assert torch.equal(normalize_views(reference[None])[0], reference)  # a float batch passes through
    channels_last = pixels.contiguous(memory_format=torch.channels_last)  # as collate_views stacks the fast path's
    assert normalize_views(channels_last).is_contiguous()
    assert torch.equal(normalize_views(channels_last), normalize_views(pixels.contiguous()))
