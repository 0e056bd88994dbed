"""The v3 linear-classification protocol (moco-v3 c349e6e ``main_lincls.py``): chosen for timm ViTs, explicit keys
win, lr per 256 with a per-epoch cosine, class-token features, no BN before the classifier."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mocolab.config import LinclsConfig, ModelConfig, resolve_lincls
from mocolab.evaluate.lincls import LinearProbe, lr_at_epoch, make_classifier, make_optimizer, peak_lr
from mocolab.moco.backbones import build_backbone

VIT = "timm:vit_tiny_patch16_224"


def test_a_vit_gets_the_v3_protocol_and_other_backbones_keep_mocos():
    vit = resolve_lincls(LinclsConfig(), VIT)
    assert (vit.protocol, vit.lr, vit.lr_per_256, vit.schedule) == ("v3", 3.0, True, "cosine")
    assert (vit.momentum, vit.weight_decay) == (0.9, 0.0)
    for arch in ("small_cnn", "resnet50", "timm:resnet18"):
        lin = resolve_lincls(LinclsConfig(), arch)
        assert (lin.protocol, lin.lr, lin.lr_per_256, lin.schedule) == ("moco", 30.0, False, "step"), arch
    # v3 asked for on a ResNet: the v3 code's default lr
    assert resolve_lincls(LinclsConfig(protocol="v3"), "resnet50").lr == 0.1


def test_explicit_keys_win_and_resolving_twice_changes_nothing():
    lin = resolve_lincls(LinclsConfig(lr=0.5, schedule="step"), VIT)
    assert (lin.protocol, lin.lr, lin.schedule, lin.lr_per_256) == ("v3", 0.5, "step", True)
    assert resolve_lincls(lin, "small_cnn") == lin  # a resolved section (a worker's copy) stays as it is
    moco_on_vit = resolve_lincls(LinclsConfig(protocol="moco"), VIT)
    assert (moco_on_vit.lr, moco_on_vit.schedule) == (30.0, "step")


def test_v3_lr_is_per_256_and_cosine_per_epoch_as_main_lincls():
    lin = resolve_lincls(LinclsConfig(epochs=90, batch_size=128), VIT)
    init_lr = 3.0 * (128 * 4) / 256  # main_lincls: args.lr * args.batch_size / 256, batch over all workers
    assert peak_lr(lin, world_size=4) == pytest.approx(init_lr)
    for epoch in (0, 1, 45, 89):
        official = init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / 90))
        assert lr_at_epoch(epoch, lin, world_size=4) == pytest.approx(official)
    (group,) = make_optimizer(nn.Linear(4, 2), lin, world_size=4).param_groups
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (pytest.approx(init_lr), 0.9, 0.0)


def test_vit_probe_features_are_the_class_token_into_a_plain_linear_layer():
    torch.manual_seed(0)
    model = ModelConfig(arch=VIT, timm_kwargs={"depth": 1, "patch_size": 4}, bn="plain")
    backbone, dim = build_backbone(model, image_size=16)
    probe = LinearProbe(backbone, make_classifier(dim, 10))
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        tokens = backbone.forward_features(images)  # [B, 1 + patches, D], after the final norm
    assert torch.equal(probe.features(images), tokens[:, 0])
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in probe.classifier.modules())
    assert type(probe.classifier) is nn.Linear
