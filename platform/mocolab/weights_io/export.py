"""A backbone written for other programs (``mocolab export``: ``mocolab.commands.export``).

``torchvision`` is ``torch.save`` of the torchvision-keyed ``state_dict`` (no ``fc.*``; load it with
``strict=False``), ``detectron2`` the pickle MoCo's ``detection/convert-pretrain-to-detectron2.py`` writes
(ResNets with the ImageNet stem only), for detectron2's ``MODEL.WEIGHTS`` (e.g. MoCo's
``detection/configs/pascal_voc_R_50_C4_24k_moco.yaml``).
``timm`` (a ``model.arch: timm:<name>`` backbone) is ``torch.save`` of ``{"model": name, "kwargs": {...},
"state_dict": ...}``: ``timm.create_model(name, **kwargs).load_state_dict(state_dict, strict=True)`` loads it
(checked before the file is written). The name and arguments come from the run's config, or from a file this
format wrote.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mocolab.config import ConfigError
from mocolab.weights_io.arch import guess_arch
from mocolab.weights_io.detectron2 import write_detectron2
from mocolab.weights_io.layouts import BackboneWeights

FORMATS = ("torchvision", "detectron2", "timm")


@dataclass(frozen=True)
class TimmModel:
    """What ``timm.create_model(name, **kwargs)`` builds."""

    name: str
    kwargs: dict[str, Any]


def timm_model_of(cfg) -> TimmModel | None:
    """The timm model of a config's ``model.arch: timm:<name>`` (arguments as mocolab built it), else None."""
    from mocolab.moco.backbones import TIMM_PREFIX
    from mocolab.moco.timm_backbones import creation_kwargs

    if not cfg.model.arch.startswith(TIMM_PREFIX):
        return None
    name = cfg.model.arch.removeprefix(TIMM_PREFIX)
    return TimmModel(name, creation_kwargs(name, cfg.model.timm_kwargs, cfg.data.image_size))


def timm_file(state: dict[str, torch.Tensor], model: TimmModel | None, where: str) -> dict[str, Any]:
    """The ``--format timm`` content, after checking that timm loads it strictly; ConfigError otherwise."""
    import timm

    if model is None:
        raise ConfigError(
            f"{where}: --format timm needs the timm model's name and arguments: give --pretrain-run of a "
            "model.arch=timm:<name> run, or a file --format timm wrote"
        )
    try:
        timm.create_model(model.name, **model.kwargs).load_state_dict(state, strict=True)
    except RuntimeError as err:
        first_line = str(err).splitlines()[0]
        raise ConfigError(f"{where}: timm's {model.name} does not load these weights: {first_line}") from None
    return {"model": model.name, "kwargs": dict(model.kwargs), "state_dict": state}


def check_detectron2(state: dict[str, torch.Tensor], where: str) -> str:
    """The ResNet ``state`` is, if detectron2 has a counterpart for it; ConfigError otherwise."""
    guess = guess_arch(state)
    if guess is None or not guess.is_resnet:
        kind = guess.arch if guess else "not a ResNet"
        raise ConfigError(
            f"{where}: --format detectron2 needs a ResNet backbone; these weights are {kind}, which detectron2 "
            "has no counterpart for. Use --format torchvision"
        )
    if guess.cifar_stem:
        raise ConfigError(
            f"{where}: a CIFAR-stem {guess.arch} (3x3 conv1, no max-pool) has no detectron2 counterpart (its stem "
            "is a 7x7 conv + max-pool, so conv1 would not load). Use --format torchvision"
        )
    return guess.arch


def export(weights: BackboneWeights, fmt: str, out: Path, where: str, model: TimmModel | None = None) -> str:
    """Write ``weights`` to ``out`` in ``fmt`` (``timm``: as ``model``); returns a line saying what was written."""
    if fmt == "timm":
        content = timm_file(weights.state, model, where)
        _save(content, out)
        return f"{len(weights.state)} tensors -> {out} (timm.create_model({model.name!r}, **kwargs), strict)"
    if fmt == "detectron2":
        arch = check_detectron2(weights.state, where)
        write_detectron2(weights.state, out)
        return f"{arch}, {len(weights.state)} arrays -> {out} (detectron2: MODEL.WEIGHTS {out})"
    _save(weights.state, out)
    return f"{len(weights.state)} tensors -> {out} (torchvision keys, no fc.*)"


def _save(content: Any, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    torch.save(content, tmp)
    os.replace(tmp, out)
