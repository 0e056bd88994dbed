"""Linear-eval protocol details, without Ray: frozen backbone in eval mode, BN statistics untouched,
classifier init, step schedule, top-k counting, the backbone-unchanged check, backbone sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from mocolab.config import ConfigError, LinclsConfig, ModelConfig, build_config, resolve_lincls
from mocolab.evaluate.lincls import (
    LinearProbe,
    LinearTrainTransform,
    lr_at_epoch,
    make_classifier,
    make_optimizer,
    metric_names,
    milestone_epochs,
    topk_correct,
)
from mocolab.evaluate.weights import (
    BackboneChangedError,
    assert_unchanged,
    check_source,
    load_backbone_state,
    resolve_source,
    snapshot,
)
from mocolab.moco.backbones import backbone_state_dict, build_backbone


def _probe(arch: str = "small_cnn") -> LinearProbe:
    torch.manual_seed(0)
    backbone, dim = build_backbone(ModelConfig(arch=arch, bn="plain"))
    return LinearProbe(backbone, make_classifier(dim, 10))


def test_classifier_init_is_normal_0_001_with_zero_bias():
    torch.manual_seed(0)
    fc = make_classifier(2048, 1000)
    assert fc.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert abs(fc.weight.mean().item()) < 1e-4
    assert torch.count_nonzero(fc.bias) == 0


def test_backbone_stays_in_eval_mode_and_frozen():
    probe = _probe()
    probe.train()
    assert probe.classifier.training
    assert not any(m.training for m in probe.backbone.modules())
    assert not any(p.requires_grad for p in probe.backbone.parameters())
    assert all(p.requires_grad for p in probe.classifier.parameters())


def test_training_changes_only_the_classifier_and_leaves_bn_statistics():
    probe = _probe()
    before = snapshot(probe.backbone)
    classifier_before = probe.classifier.weight.detach().clone()
    optimizer = torch.optim.SGD(probe.classifier.parameters(), lr=30.0, momentum=0.9)
    probe.train()
    for _ in range(3):
        images, labels = torch.randn(8, 3, 24, 24) * 3 + 1, torch.randint(0, 10, (8,))
        loss = F.cross_entropy(probe(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert_unchanged(before, probe.backbone)  # weights and BN running stats bit-identical
    assert not torch.equal(classifier_before, probe.classifier.weight)


@pytest.mark.parametrize("tamper", ["weight", "running_mean"])
def test_backbone_changed_check_raises_when_tampered(tamper):
    probe = _probe()
    before = snapshot(probe.backbone)
    bn = next(m for m in probe.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        getattr(bn, tamper).add_(1e-3)
    with pytest.raises(BackboneChangedError, match="frozen backbone changed"):
        assert_unchanged(before, probe.backbone)


def test_bn_in_train_mode_would_be_caught():
    """The check is not vacuous: a forward pass in train mode moves BN statistics, and it notices."""
    probe = _probe()
    before = snapshot(probe.backbone)
    probe.backbone.train()
    probe.backbone(torch.randn(4, 3, 24, 24))
    with pytest.raises(BackboneChangedError):
        assert_unchanged(before, probe.backbone)


def test_protocol_defaults_are_the_papers():
    """MoCo's linear classification protocol (main_lincls.py): 100 epochs, batch 256, SGD lr 30, momentum 0.9,
    no weight decay, lr x0.1 at epochs 60 and 80."""
    lin = resolve_lincls(LinclsConfig(), "small_cnn")
    assert (lin.epochs, lin.batch_size, lin.lr, lin.momentum, lin.weight_decay) == (100, 256, 30.0, 0.9, 0.0)
    assert (lin.protocol, lin.schedule, lin.lr_per_256) == ("moco", "step", False)
    assert milestone_epochs(lin.epochs, lin.milestones) == [60, 80]


@pytest.mark.parametrize(
    "lin",
    [
        resolve_lincls(LinclsConfig(), "resnet18"),
        resolve_lincls(LinclsConfig(lr=0.5, momentum=0.5, weight_decay=1e-3), "resnet18"),
    ],
    ids=["defaults", "set"],
)
def test_optimizer_is_plain_sgd_with_the_configured_settings(lin):
    fc = make_classifier(16, 3)
    (group,) = make_optimizer(fc, lin).param_groups
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (lin.lr, lin.momentum, lin.weight_decay)
    assert (group["nesterov"], group["dampening"]) == (False, 0)
    assert group["params"] == list(fc.parameters())


def test_step_schedule_at_60_and_80_percent():
    lin = resolve_lincls(LinclsConfig(), "resnet50")
    assert milestone_epochs(100, lin.milestones) == [60, 80]
    assert [lr_at_epoch(e, lin) for e in (0, 59, 60, 79, 80, 99)] == pytest.approx([30, 30, 3, 3, 0.3, 0.3])


def test_topk_correct_counts():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]])
    labels = torch.tensor([0, 1, 2])
    # row 0: top-1 hit; row 1: label 1 is second; row 2: label 2 is last (top-5 is capped at 3 classes)
    assert topk_correct(logits, labels, ks=(1, 2, 5)).tolist() == [1, 2, 3]


def test_metric_names():
    assert metric_names(False) == ("lincls_top1", "lincls_top5")
    assert metric_names(True) == ("lincls_fast_top1", "lincls_fast_top5")


def test_train_transform_crops_and_normalises():
    out = LinearTrainTransform(32)(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and out.min() < 0


def _cfg(**model):
    return build_config({"model": {"arch": "resnet18", "bn": "plain", **model}, "scaling": {"num_workers": 1}})


def test_source_arguments_are_exclusive(tmp_path):
    cfg = _cfg()
    with pytest.raises(ConfigError, match="exactly one"):
        resolve_source(cfg)
    with pytest.raises(ConfigError, match="exactly one"):
        resolve_source(cfg, pretrain_run="abc", init="random")
    with pytest.raises(ConfigError, match="--init supervised needs --weights"):
        resolve_source(cfg, init="supervised")
    with pytest.raises(ConfigError, match="no such file"):
        resolve_source(cfg, weights=str(tmp_path / "missing.pt"))


def test_supervised_torchvision_weights_load_with_fc_dropped(tmp_path):
    net = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)  # a torchvision file as downloaded: includes fc.*
    source = resolve_source(_cfg(), weights=str(path), init="supervised")
    assert source.init == "supervised" and not any(k.startswith("fc.") for k in source.state)
    backbone, _ = build_backbone(source.model)
    load_backbone_state(backbone, source)
    assert torch.equal(backbone.layer4[1].bn2.running_var, net.layer4[1].bn2.running_var)


def test_weights_of_another_architecture_are_refused(tmp_path):
    small, _ = build_backbone(ModelConfig(arch="small_cnn", bn="plain"))
    path = tmp_path / "backbone.pt"
    torch.save(backbone_state_dict(small), path)
    source = resolve_source(_cfg(), weights=str(path))
    assert source.init == "file"
    with pytest.raises(ConfigError, match="does not fit model.arch=resnet18.*--set model.arch=small_cnn"):
        check_source(source)  # the pre-flight step's check, in the driver before any run exists


@pytest.mark.usefixtures("one_torch_thread")
def test_the_loop_trains_the_classifier_with_the_protocol(monkeypatch, tmp_path):
    """``lincls_train_loop`` itself (Ray Train local mode: the loop runs in this process, no cluster) builds one SGD
    over the classifier only, initialised N(0, 0.01) with zero bias, with the protocol's momentum and weight decay,
    and steps it at lr 30, then 3 from 60 % and 0.3 from 80 % of the epochs. (The loop sets torch's thread
    count; ``one_torch_thread`` restores it.)"""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mocolab.evaluate.lincls import lincls_train_loop
    from mocolab.evaluate.weights import BackboneSource

    built = []

    class RecordingSGD(torch.optim.SGD):
        def __init__(self, params, *args, **kwargs):
            super().__init__(params, *args, **kwargs)
            self.initial = [p.detach().clone() for group in self.param_groups for p in group["params"]]
            self.lrs = []
            built.append(self)

        def step(self, closure=None):
            self.lrs.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "SGD", RecordingSGD)
    # local mode leaves this process marked as a Train worker (a module global of Ray's): undone after the test
    from ray.train.v2._internal.execution import train_fn_utils

    monkeypatch.setattr(train_fn_utils, "_train_fn_utils", train_fn_utils._train_fn_utils)
    epochs, train_images, batch = 10, 64, 32
    cfg = build_config(
        {
            "model": {"arch": "small_cnn", "bn": "plain"},
            "data": {
                "dataset": "digits",
                "image_size": 16,
                "limit_train": train_images,
                "limit_test": 32,
                "loader_workers": 0,
            },
            "scaling": {"num_workers": 1},
            "eval": {"lincls": {"epochs": epochs, "batch_size": batch, "fast": True}},
        }
    )
    trainer = TorchTrainer(
        lincls_train_loop,
        train_loop_config={"config": cfg.model_dump(mode="json"), "source": BackboneSource("random", cfg.model)},
        scaling_config=ScalingConfig(num_workers=0),
        run_config=RunConfig(name="lincls-protocol", storage_path=str(tmp_path)),
    )
    assert "lincls_fast_top1" in trainer.fit().return_value

    (optimizer,) = built
    weight, bias = optimizer.initial
    assert weight.shape == (10, 256) and bias.shape == (10,)  # the classifier only: small_cnn features -> 10 digits
    assert weight.std().item() == pytest.approx(0.01, rel=0.1) and torch.count_nonzero(bias) == 0
    assert (optimizer.defaults["momentum"], optimizer.defaults["weight_decay"]) == (0.9, 0.0)
    assert (optimizer.defaults["nesterov"], optimizer.defaults["dampening"]) == (False, 0)
    per_epoch = [30.0] * 6 + [3.0] * 2 + [0.3] * 2
    assert optimizer.lrs == pytest.approx([lr for lr in per_epoch for _ in range(train_images // batch)])
