"""``mocolab export (--pretrain-run ID | --weights PATH) --format torchvision|detectron2|timm --out FILE``.

Writes a backbone for other programs: ``torchvision`` is ``torch.save`` of the torchvision-keyed
``state_dict`` (no ``fc.*``; load it with ``strict=False``), ``detectron2`` the pickle MoCo's
``detection/convert-pretrain-to-detectron2.py`` writes (ResNets with the ImageNet stem only), for
detectron2's ``MODEL.WEIGHTS`` (e.g. MoCo's ``detection/configs/pascal_voc_R_50_C4_24k_moco.yaml``).
``timm`` (a ``model.arch: timm:<name>`` backbone) is ``torch.save`` of ``{"model": name, "kwargs": {...},
"state_dict": ...}``: ``timm.create_model(name, **kwargs).load_state_dict(state_dict, strict=True)`` loads it
(checked before the file is written). The name and arguments come from the run's config, or from a file this
format wrote.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from mocolab.config import ConfigError, absolute_tracking_uri, default_tracking_uri
from mocolab.weights_io.arch import guess_arch
from mocolab.weights_io.detectron2 import write_detectron2
from mocolab.weights_io.layouts import BackboneWeights

FORMATS = ("torchvision", "detectron2", "timm")


def read_source(
    pretrain_run: str | None, weights: str | None, tracking_uri: str
) -> tuple[str, BackboneWeights, Optional[TimmModel]]:
    """``(what it is, the backbone, its timm model or None)`` of a pretraining run's ``backbone.pt`` (the timm
    model from its config) or of a weights file (from the file, if ``--format timm`` wrote it)."""
    from mocolab.weights_io.files import backbone_weights, read_weights_file

    if pretrain_run:
        from mocolab.config import build_config
        from mocolab.tracking import load_pretrain_artifacts

        where = f"--pretrain-run {pretrain_run}"
        config, content = load_pretrain_artifacts(tracking_uri, pretrain_run)
        return where, backbone_weights(content, where), timm_model_of(build_config(config))
    where = f"--weights {weights}"
    content = read_weights_file(weights, where)
    named = isinstance(content, dict) and isinstance(content.get("model"), str)
    named = named and isinstance(content.get("kwargs"), dict)
    return where, backbone_weights(content, where), TimmModel(content["model"], content["kwargs"]) if named else None


@dataclass(frozen=True)
class TimmModel:
    """What ``timm.create_model(name, **kwargs)`` builds."""

    name: str
    kwargs: dict[str, Any]


def timm_model_of(cfg) -> Optional[TimmModel]:
    """The timm model of a config's ``model.arch: timm:<name>`` (arguments as mocolab built it), else None."""
    from mocolab.moco.backbones import TIMM_PREFIX
    from mocolab.moco.timm_backbones import creation_kwargs

    if not cfg.model.arch.startswith(TIMM_PREFIX):
        return None
    name = cfg.model.arch.removeprefix(TIMM_PREFIX)
    return TimmModel(name, creation_kwargs(name, cfg.model.timm_kwargs, cfg.data.image_size))


def timm_file(state: dict[str, torch.Tensor], model: Optional[TimmModel], where: str) -> dict[str, Any]:
    """The ``--format timm`` content, after checking that timm loads it strictly; ConfigError otherwise."""
    import timm

    if model is None:
        raise ConfigError(f"{where}: --format timm needs the timm model's name and arguments: give --pretrain-run of a "
                          "model.arch=timm:<name> run, or a file --format timm wrote")
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


def export(weights: BackboneWeights, fmt: str, out: Path, where: str, model: Optional[TimmModel] = None) -> str:
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pretrain-run", metavar="RUN_ID", help="MLflow id of a finished pretraining run")
    source.add_argument("--weights", metavar="PATH", help="a weights file of any layout --weights of lincls reads")
    parser.add_argument("--format", choices=FORMATS, required=True, help="torchvision state_dict, detectron2 .pkl or timm (model name, kwargs, state_dict)")
    parser.add_argument("--out", metavar="FILE", required=True, help="the file to write")
    parser.add_argument(
        "--tracking-uri", metavar="URI", help="MLflow store of --pretrain-run (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"
    )


def main(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    if out.is_dir():
        raise ConfigError(f"--out {args.out} is a folder; give the file to write, e.g. --out {Path(args.out) / 'backbone.pth'}")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {args.out}: the folder {out.parent} does not exist; create it or write elsewhere")
    uri = absolute_tracking_uri(args.tracking_uri or default_tracking_uri(), Path.cwd())
    where, weights, model = read_source(args.pretrain_run, args.weights, uri)
    written = export(weights, args.format, out, where, model)
    print(f"[mocolab export] {where}: {weights.summary()}; {written}")
    return 0
