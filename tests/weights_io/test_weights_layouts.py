"""Researchers' own weights in: every layout --weights reads, built here as the program that writes it saves
it (no download), loads into lincls's backbone and into the detector with tensors equal to the original.

Writers: mocolab backbone.pt and checkpoint.pt (the real code), the official MoCo v1/v2 builder's DDP
state dict with its MLP head, MoCo v3's, solo-learn's and lightly's Lightning/plain models, a torchvision
state dict (with fc, also DataParallel-wrapped as the official lincls saves it), a timm-style training
checkpoint (timm ResNets use torchvision's names; timm itself is not installed here) and detectron2
pickles (MoCo's convert-pretrain-to-detectron2.py rules, re-typed below as an independent oracle).
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from mocolab.config import DetectionConfig, build_config
from mocolab.evaluate.detection import build_detector, from_detector_keys, load_backbone_into_detector
from mocolab.evaluate.weights import check_source, load_backbone_state, resolve_source
from mocolab.moco.backbones import backbone_state_dict, build_backbone
from mocolab.weights_io.files import load_backbone_weights
from mocolab.weights_io.layouts import LAYOUTS

SMALL_DET = dict(min_size=64, max_size=96, roi_batch_size=16, test_proposals=20)


def _distinct(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and non-default BN statistics, so that a tensor loaded into the wrong place shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    return module


def _resnet(arch: str, cifar_stem: bool = False) -> nn.Module:
    net = getattr(torchvision.models, arch)()
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    return _distinct(net)


def _trunk(net: nn.Module) -> dict[str, torch.Tensor]:
    """What a layout must give back: the torchvision keys without the classifier."""
    return {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("fc.")}


def _mlp_head(net: nn.Module) -> nn.Module:
    dim = net.fc.in_features
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 128))


# --- writers: (net, directory) -> the file the program writes -------------------------------------------


def write_torchvision(net, d: Path) -> Path:
    torch.save(net.state_dict(), d / "resnet.pth")  # as torchvision's ImageNet weights: with fc.*
    return d / "resnet.pth"


def write_torchvision_dataparallel(net, d: Path) -> Path:
    """The official MoCo main_lincls.py checkpoint: a DataParallel ResNet with its trained fc."""
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save(
        {"epoch": 100, "arch": "resnet50", "state_dict": state, "best_acc1": torch.tensor(60.0)}, d / "lincls.pth.tar"
    )
    return d / "lincls.pth.tar"


def write_timm_training_checkpoint(net, d: Path) -> Path:
    torch.save({"epoch": 3, "arch": "resnet18", "state_dict": net.state_dict(), "version": 2}, d / "timm.pth.tar")
    return d / "timm.pth.tar"


def write_mocolab_backbone(net, d: Path) -> Path:
    torch.save(backbone_state_dict(net), d / "backbone.pt")
    return d / "backbone.pt"


def write_mocolab_checkpoint(net, d: Path) -> Path:
    """The real MoCo model and checkpoint writer, the query backbone set to ``net``'s weights."""
    from mocolab.moco.model import MoCo
    from mocolab.train.checkpoint import save_checkpoint

    arch = "small_cnn" if hasattr(net, "features") else "resnet18"
    cfg = build_config({"model": {"arch": arch, "bn": "split", "bn_splits": 2}, "moco": {"queue_size": 64},
                        "train": {"batch_size": 8}, "scaling": {"num_workers": 1}})  # fmt: skip
    model = MoCo.from_config(cfg, num_train_samples=64)
    model.encoder_q.backbone.load_state_dict(backbone_state_dict(net))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1, "global_step": 8,
             "mlflow_run_id": "0" * 32, "config": cfg.model_dump(mode="json")}  # fmt: skip
    return save_checkpoint(d, state)


class OfficialMoCo(nn.Module):
    """The official builder's modules: encoder_q/encoder_k ResNets with an MLP fc, the queue (MoCo v2)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.encoder_q = copy.deepcopy(net)
        self.encoder_q.fc = _mlp_head(net)
        self.encoder_k = _distinct(copy.deepcopy(self.encoder_q), seed=5)
        self.register_buffer("queue", torch.randn(128, 64))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))


def _official_moco_state(net) -> dict[str, torch.Tensor]:
    model = OfficialMoCo(net)
    return {f"module.{k}": v for k, v in model.state_dict().items()}  # DistributedDataParallel's prefix


def write_moco_official(net, d: Path) -> Path:
    state = _official_moco_state(net)
    optimizer = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.03, momentum=0.9)
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": state, "optimizer": optimizer.state_dict()},
               d / "checkpoint_0199.pth.tar")  # fmt: skip
    return d / "checkpoint_0199.pth.tar"


def write_moco_v3_official(net, d: Path) -> Path:
    base = copy.deepcopy(net)
    base.fc = _mlp_head(net)
    model = nn.ModuleDict({"base_encoder": base, "momentum_encoder": _distinct(copy.deepcopy(base), 3),
                           "predictor": nn.Linear(128, 128)})  # fmt: skip
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 100, "arch": "resnet50", "state_dict": state}, d / "mocov3.pth.tar")
    return d / "mocov3.pth.tar"


def write_solo_learn(net, d: Path) -> Path:
    """solo-learn's BaseMomentumMethod: backbone (fc = Identity), projector, momentum copies, classifier, queue."""
    backbone = copy.deepcopy(net)
    dim = backbone.fc.in_features
    backbone.fc = nn.Identity()
    model = nn.ModuleDict({
        "backbone": backbone, "projector": nn.Linear(dim, 128), "classifier": nn.Linear(dim, 10),
        "momentum_backbone": _distinct(copy.deepcopy(backbone), 4), "momentum_projector": nn.Linear(dim, 128),
    })  # fmt: skip
    state = {**model.state_dict(), "queue": torch.randn(2, 128, 64)}
    torch.save(
        {
            "epoch": 400,
            "global_step": 10,
            "pytorch-lightning_version": "2.0.2",
            "state_dict": state,
            "loops": {},
            "callbacks": {},
            "optimizer_states": [],
            "lr_schedulers": [],
        },
        d / "solo.ckpt",
    )
    return d / "solo.ckpt"


class LightlyMoCo(nn.Module):
    """lightly's examples/pytorch/moco.py model around ``nn.Sequential(*list(resnet.children())[:-1])``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.backbone = nn.Sequential(*list(copy.deepcopy(net).children())[:-1])
        self.projection_head = nn.Linear(net.fc.in_features, 128)
        self.backbone_momentum = _distinct(copy.deepcopy(self.backbone), 6)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)


def write_lightly(net, d: Path) -> Path:
    torch.save(LightlyMoCo(net).state_dict(), d / "lightly.pth")
    return d / "lightly.pth"


def write_lightly_lightning(net, d: Path) -> Path:
    torch.save({"epoch": 10, "state_dict": LightlyMoCo(net).state_dict()}, d / "lightly.ckpt")
    return d / "lightly.ckpt"


def write_lightly_backbone(net, d: Path) -> Path:
    """lightly's tutorial: ``torch.save({'resnet18_parameters': backbone.state_dict()}, 'model.pth')``."""
    torch.save({"resnet18_parameters": LightlyMoCo(net).backbone.state_dict()}, d / "model.pth")
    return d / "model.pth"


def official_detectron2_name(k: str) -> str:
    """MoCo's detection/convert-pretrain-to-detectron2.py (7397dfe) renaming, re-typed as the oracle."""
    if "layer" not in k:
        k = "stem." + k
    for t in [1, 2, 3, 4]:
        k = k.replace(f"layer{t}", f"res{t + 1}")
    for t in [1, 2, 3]:
        k = k.replace(f"bn{t}", f"conv{t}.norm")
    return k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def write_detectron2_official(net, d: Path) -> Path:
    """What MoCo's conversion script writes from an official checkpoint (its MLP head becomes stem.fc.*)."""
    model = {
        official_detectron2_name(k.removeprefix("module.encoder_q.")): v.numpy()
        for k, v in _official_moco_state(net).items()
        if k.startswith("module.encoder_q.")
    }
    with open(d / "moco_r50.pkl", "wb") as f:
        pickle.dump({"model": model, "__author__": "MOCO", "matching_heuristics": True}, f)
    return d / "moco_r50.pkl"


def write_detectron2_export(net, d: Path) -> Path:
    from mocolab import cli

    source = write_mocolab_backbone(net, d)
    assert cli.main(["export", "--weights", str(source), "--format", "detectron2", "--out", str(d / "d2.pkl")]) == 0
    return d / "d2.pkl"


CASES: list[tuple[str, Callable, str, str]] = [  # (case, writer, model.arch, expected layout)
    ("torchvision", write_torchvision, "resnet18", "torchvision"),
    ("torchvision-dataparallel", write_torchvision_dataparallel, "resnet18", "torchvision"),
    ("timm-checkpoint", write_timm_training_checkpoint, "resnet18", "torchvision"),
    ("mocolab-backbone", write_mocolab_backbone, "resnet18", "torchvision"),
    ("mocolab-backbone-small", write_mocolab_backbone, "small_cnn", "torchvision"),
    ("mocolab-checkpoint", write_mocolab_checkpoint, "resnet18", "mocolab-checkpoint"),
    ("mocolab-checkpoint-small", write_mocolab_checkpoint, "small_cnn", "mocolab-checkpoint"),
    ("moco-official-r50", write_moco_official, "resnet50", "moco-official"),
    ("moco-v3-official", write_moco_v3_official, "resnet18", "moco-v3-official"),
    ("solo-learn", write_solo_learn, "resnet18", "solo-learn"),
    ("lightly", write_lightly, "resnet18", "lightly"),
    ("lightly-lightning", write_lightly_lightning, "resnet18", "lightly"),
    ("lightly-backbone", write_lightly_backbone, "resnet18", "lightly-backbone"),
    ("detectron2-official-r50", write_detectron2_official, "resnet50", "detectron2"),
    ("detectron2-export", write_detectron2_export, "resnet18", "detectron2"),
]


def _source_net(arch: str) -> nn.Module:
    if arch == "small_cnn":
        return _distinct(build_backbone(build_config({"model": {"arch": "small_cnn", "bn": "plain"}}).model)[0])
    return _resnet(arch)


def test_every_known_layout_has_a_case():
    assert {layout.name for layout in LAYOUTS} == {case[3] for case in CASES}


@pytest.mark.parametrize("case,writer,arch,layout", CASES, ids=[c[0] for c in CASES])
def test_layout_loads_into_lincls_and_detector_with_equal_tensors(case, writer, arch, layout, tmp_path):
    net = _source_net(arch)
    expected = _trunk(net)
    path = writer(net, tmp_path)

    found = load_backbone_weights(path, f"--weights {path}")
    assert found.layout.name == layout
    assert set(found.state) == set(expected)
    assert all(torch.equal(found.state[k], v) for k, v in expected.items())

    cfg = build_config({"model": {"arch": arch, "bn": "plain"}, "scaling": {"num_workers": 1}})
    source = resolve_source(cfg, weights=str(path))
    check_source(source)  # the pre-flight step's fit check passes
    backbone, _ = build_backbone(source.model)  # as the lincls worker builds it
    load_backbone_state(backbone, source)
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in expected.items())

    det = DetectionConfig(fpn=arch != "small_cnn", bn="train", **SMALL_DET)
    detector, det_layout = build_detector(source.model, det, num_classes=2)
    load_backbone_into_detector(detector, source.state, det_layout)
    trunk = from_detector_keys(detector.state_dict(), det_layout)
    assert set(trunk) == set(expected)
    assert all(torch.equal(trunk[k], v) for k, v in expected.items())


def test_summary_names_the_layout_and_what_was_left_out(tmp_path):
    found = load_backbone_weights(write_moco_official(_resnet("resnet18"), tmp_path), "--weights x")
    line = found.summary()
    assert "moco-official (state_dict)" in line and "head fc.* dropped (4)" in line
    assert "ignored" in line and "encoder_k, queue, queue_ptr" in line  # the key encoder and queue, counted
    assert len(found.ignored) == len(_trunk(_resnet("resnet18"))) + 4 + 2  # encoder_k + its head + queue, ptr


def test_exported_detectron2_names_follow_the_official_conversion(tmp_path):
    net = _resnet("resnet50")
    with open(write_detectron2_export(net, tmp_path), "rb") as f:
        exported = pickle.load(f)  # our own file: plain pickle is fine in the test
    assert exported["matching_heuristics"] is True and exported["__author__"] == "mocolab"
    assert set(exported["model"]) == {official_detectron2_name(k) for k in _trunk(net)}
    assert "stem.conv1.norm.running_var" in exported["model"] and "res5.2.conv3.norm.weight" in exported["model"]
    assert "res3.0.shortcut.norm.running_mean" in exported["model"]
    back = load_backbone_weights(tmp_path / "d2.pkl", "--weights d2.pkl").state  # and round-trips
    assert set(back) == set(_trunk(net)) and all(torch.equal(back[k], v) for k, v in _trunk(net).items())
