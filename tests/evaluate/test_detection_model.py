"""Faster R-CNN on mocolab backbones: key conversion round trip, layouts, BN modes, refusals, schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from mocolab.config import ConfigError, DetectionConfig, ModelConfig, build_config
from mocolab.evaluate.detection import (
    anchor_sizes,
    build_detector,
    check_detection,
    clip_gradients,
    from_detector_keys,
    load_backbone_into_detector,
    lr_factor,
    to_detector_keys,
)
from mocolab.moco.backbones import backbone_state_dict, build_backbone
from mocolab.moco.norm import AllReduceBatchNorm2d

SMALL = dict(min_size=64, max_size=96, roi_batch_size=16, test_proposals=20)


def _pretrained_state(model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A backbone.pt as pretraining writes it, with non-default BN statistics."""
    torch.manual_seed(1)
    backbone, _ = build_backbone(model_cfg)
    for m in backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(7)
    return backbone_state_dict(backbone)


@pytest.mark.parametrize(
    "arch,fpn,bn,layout",
    [
        ("resnet18", True, "frozen", "fpn"),
        ("resnet18", False, "train", "c4"),
        ("resnet18", True, "sync", "fpn"),
        ("small_cnn", False, "frozen", "single"),
    ],
)
def test_backbone_pt_round_trips_through_the_detector(arch, fpn, bn, layout):
    model_cfg = ModelConfig(arch=arch, bn="plain")
    detector, got_layout = build_detector(model_cfg, DetectionConfig(fpn=fpn, bn=bn, **SMALL), num_classes=3)
    assert got_layout == layout
    state = _pretrained_state(model_cfg)
    load_backbone_into_detector(detector, state, layout)
    back = from_detector_keys(detector.state_dict(), layout)
    expected = {k: v for k, v in state.items() if k in back}
    assert set(state) - set(back) <= {k for k in state if k.endswith("num_batches_tracked")}
    for key, value in expected.items():
        assert torch.equal(back[key], value), key
    bn_classes = {type(m) for m in detector.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))}
    expected_class = {"frozen": FrozenBatchNorm2d, "train": nn.BatchNorm2d, "sync": AllReduceBatchNorm2d}[bn]
    assert bn_classes == {expected_class}  # every BN of the detector, on CPU


def test_converted_keys_load_strictly_into_the_trunk():
    model_cfg = ModelConfig(arch="resnet18", bn="plain")
    detector, _ = build_detector(model_cfg, DetectionConfig(bn="train", **SMALL), num_classes=1)
    converted = to_detector_keys(_pretrained_state(model_cfg), "fpn")
    assert all(k.startswith("backbone.body.") for k in converted)
    body = {k.removeprefix("backbone.body."): v for k, v in converted.items()}
    detector.backbone.body.load_state_dict(body, strict=True)
    c4 = to_detector_keys(_pretrained_state(model_cfg), "c4")
    assert "roi_heads.box_head.layer4.0.conv1.weight" in c4 and "backbone.body.layer3.0.conv1.weight" in c4


def test_weights_of_another_arch_are_refused():
    detector, layout = build_detector(ModelConfig(arch="resnet18", bn="plain"), DetectionConfig(**SMALL), 1)
    with pytest.raises(ConfigError, match="do not fit the detector's fpn trunk"):
        load_backbone_into_detector(detector, _pretrained_state(ModelConfig(arch="small_cnn", bn="plain")), layout)


def test_detector_trains_and_predicts_on_a_tiny_batch():
    detector, _ = build_detector(ModelConfig(arch="small_cnn", bn="plain"), DetectionConfig(fpn=False, **SMALL), 2)
    images = [torch.rand(3, 64, 64), torch.rand(3, 60, 70)]
    targets = [
        {"boxes": torch.tensor([[5.0, 5, 30, 30]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[10.0, 20, 40, 50], [40, 5, 60, 25]]), "labels": torch.tensor([2, 1])},
    ]
    detector.train()
    losses = detector(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    detector.eval()
    with torch.no_grad():
        out = detector(images)
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4


def test_trainable_layers_freeze_the_stem():
    detector, _ = build_detector(
        ModelConfig(arch="resnet18", bn="plain"), DetectionConfig(trainable_layers=3, **SMALL), 1
    )
    body = detector.backbone.body
    assert not body.conv1.weight.requires_grad and not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())


def _cfg(**scaling):
    return build_config({"model": {"bn": "plain"}, "scaling": {"num_workers": 1, **scaling}})


def test_refusals_name_the_field():
    cfg = _cfg()
    check_detection(cfg, ModelConfig(arch="resnet18"), DetectionConfig(bn="sync"))  # synchronised over gloo on CPU
    with pytest.raises(ConfigError, match="eval.detection.warmup_iters=200 is longer than the run"):
        check_detection(cfg, ModelConfig(arch="resnet18"), DetectionConfig(iterations=100, warmup_iters=200))
    with pytest.raises(ConfigError, match="small_cnn has a single feature level"):
        check_detection(cfg, ModelConfig(arch="small_cnn"), DetectionConfig(fpn=True))
    with pytest.raises(ConfigError, match="anchor_sizes"):
        check_detection(cfg, ModelConfig(arch="resnet18"), DetectionConfig(anchor_sizes=[8, 16]))
    check_detection(cfg, ModelConfig(arch="small_cnn"), DetectionConfig(fpn=False, anchor_sizes=[8, 16]))


def test_anchor_sizes_scale_with_the_image():
    assert anchor_sizes(DetectionConfig(min_size=800)) == (32, 64, 128, 256, 512)
    assert anchor_sizes(DetectionConfig(min_size=400)) == (16, 32, 64, 128, 256)
    assert anchor_sizes(DetectionConfig(anchor_sizes=[8, 16, 32])) == (8, 16, 32)


def test_lr_warmup_then_steps():
    det = DetectionConfig(iterations=1000, milestones=[0.75, 0.92], warmup_iters=100, warmup_factor=0.001)
    assert lr_factor(0, det) == pytest.approx(0.001)
    assert lr_factor(50, det) == pytest.approx(0.001 * 0.5 + 0.5)
    assert [lr_factor(i, det) for i in (100, 749, 750, 919, 920, 999)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_lr_warmup_length_and_start_are_configured():
    det = DetectionConfig(iterations=100, milestones=[0.75], warmup_iters=40, warmup_factor=0.1)
    assert [lr_factor(i, det) for i in (0, 20, 39, 40, 74, 75)] == pytest.approx([0.1, 0.55, 0.9775, 1, 1, 0.1])
    assert lr_factor(0, det.model_copy(update={"warmup_iters": 0})) == 1  # no warm-up


def _grads(*values: float) -> list[nn.Parameter]:
    params = [nn.Parameter(torch.zeros(2)) for _ in values]
    for p, v in zip(params, values):
        p.grad = torch.tensor([v, 0.0])
    return params


def test_clip_gradients_scales_the_global_norm_down_to_the_limit():
    params = _grads(3.0, 4.0)  # global norm 5
    assert clip_gradients(params, 1.0) == pytest.approx(5.0)  # the norm before clipping
    assert [p.grad[0].item() for p in params] == pytest.approx([0.6, 0.8])
    params = _grads(3.0, 4.0)
    assert clip_gradients(params, 10.0) == pytest.approx(5.0)
    assert [p.grad[0].item() for p in params] == pytest.approx([3.0, 4.0])  # below the limit: untouched
    params = _grads(3.0, 4.0)
    assert clip_gradients(params, None) == pytest.approx(5.0)
    assert [p.grad[0].item() for p in params] == pytest.approx([3.0, 4.0])  # off: only measured
