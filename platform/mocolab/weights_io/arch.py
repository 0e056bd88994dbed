"""Do backbone weights fit ``model.arch``? And if not, which architecture do they look like?

:func:`check_fits` builds the backbone of the model section and compares key names and shapes (a
strict load, without its exceptions); a mismatch is one ConfigError naming the missing, unexpected and
misshapen keys and, where :func:`guess_arch` recognises the weights, the ``model.arch`` /
``model.cifar_stem`` they belong to. :func:`guess_arch` is pure: it reads the ResNet's block counts,
block type, width and stem from the keys and shapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from mocolab.config import ConfigError, ModelConfig
from mocolab.moco.backbones import RESNETS, SMALL_CNN_WIDTHS
from mocolab.weights_io.files import load_backbone_weights
from mocolab.weights_io.layouts import BackboneWeights

ARCHS = ("small_cnn", *RESNETS)  # what model.arch builds
RESNET_NAMES = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152",
}


@dataclass(frozen=True)
class ArchGuess:
    """What a backbone state looks like: ``arch`` (a mocolab arch or another ResNet's name), its stem."""

    arch: str
    cifar_stem: bool = False

    @property
    def supported(self) -> bool:
        return self.arch in ARCHS

    @property
    def is_resnet(self) -> bool:
        return "resnet" in self.arch

    def describe(self) -> str:
        return f"{self.arch} with the CIFAR stem (3x3 conv1)" if self.cifar_stem else self.arch

    def as_overrides(self) -> str:
        if not self.is_resnet:
            return f"--set model.arch={self.arch}"
        return f"--set model.arch={self.arch} --set model.cifar_stem={str(self.cifar_stem).lower()}"


def guess_arch(state: dict[str, torch.Tensor]) -> ArchGuess | None:
    """small_cnn, a torchvision ResNet (depth from its blocks, ``wide_`` when wider, CIFAR stem when conv1
    is 3x3), or None when the keys are neither."""
    widths = tuple(state[f"features.{i}.0.weight"].shape[0] for i in range(4) if f"features.{i}.0.weight" in state)
    if widths:
        return ArchGuess("small_cnn") if widths == SMALL_CNN_WIDTHS else None
    conv1 = state.get("conv1.weight")
    if conv1 is None or conv1.dim() != 4:
        return None
    blocks = []
    for stage in range(1, 5):
        indices = {int(m[1]) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.conv1\.weight$", k))}
        blocks.append(len(indices))
    kind = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    name = RESNET_NAMES.get((kind, tuple(blocks)))
    if name is None:
        name = f"a {kind}-block ResNet with {blocks} blocks per stage"
    elif kind == "bottleneck" and state["layer1.0.conv2.weight"].shape[0] != 64:
        name = f"wide_{name}_{state['layer1.0.conv2.weight'].shape[0] // 64}"
    return ArchGuess(name, cifar_stem=conv1.shape[-1] == 3)


def fit_problems(state: dict[str, torch.Tensor], model_cfg: ModelConfig, image_size: int = 224) -> list[str]:
    """Why ``state`` does not load strictly into the backbone of ``model_cfg`` (empty: it does); ``image_size``
    sets a timm ViT's ``img_size`` (its position table)."""
    from mocolab.moco.backbones import build_backbone

    plain = model_cfg.model_copy(update={"bn": "plain", "channels_last": False})
    backbone, _ = build_backbone(plain, image_size=image_size)
    target = backbone.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    shapes = [
        f"{k}: {tuple(state[k].shape)} in the file, {tuple(target[k].shape)} in the model"
        for k in target
        if k in state and state[k].shape != target[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys, e.g. {missing[:4]}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys, e.g. {unexpected[:4]}")
    if shapes:
        problems.append(f"{len(shapes)} shapes differ, e.g. {shapes[:2]}")
    return problems


def check_fits(state: dict[str, torch.Tensor], model_cfg: ModelConfig, where: str, image_size: int = 224) -> None:
    """Raise ConfigError, naming ``where``, the keys and the fix, if ``state`` does not fit ``model_cfg``."""
    problems = fit_problems(state, model_cfg, image_size)
    if not problems:
        return
    guess = guess_arch(state)
    if guess == ArchGuess(model_cfg.arch, model_cfg.cifar_stem):
        fix = f"The file has {guess.arch}'s architecture but not all of its weights: is it complete?"
    elif guess is None:
        fix = "Set model.arch / model.cifar_stem to the architecture the weights were trained with"
    elif guess.supported:
        fix = f"They look like {guess.describe()}: add {guess.as_overrides()}"
    else:
        fix = (
            f"They look like {guess.describe()}, which mocolab does not build (model.arch is one of {', '.join(ARCHS)})"
        )
    raise ConfigError(
        f"{where} does not fit model.arch={model_cfg.arch} "
        f"model.cifar_stem={str(model_cfg.cifar_stem).lower()}: {'; '.join(problems)}. {fix}"
    )


def load_checked(path, model_cfg: ModelConfig, where: str, image_size: int = 224) -> BackboneWeights:
    """The backbone in the weights file ``path`` (any known layout), checked to fit ``model_cfg`` (a timm ViT built
    for ``image_size``)."""
    weights = load_backbone_weights(path, where)
    check_fits(weights.state, model_cfg, f"{where} ({weights.layout.name} layout)", image_size)
    return weights
