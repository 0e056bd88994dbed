"""``mocolab export (--pretrain-run ID | --weights PATH) --format torchvision|detectron2 --out FILE``.

Writes a backbone for other programs: ``torchvision`` is ``torch.save`` of the torchvision-keyed
``state_dict`` (no ``fc.*``; load it with ``strict=False``), ``detectron2`` the pickle MoCo's
``detection/convert-pretrain-to-detectron2.py`` writes (ResNets with the ImageNet stem only), for
detectron2's ``MODEL.WEIGHTS`` (e.g. MoCo's ``detection/configs/pascal_voc_R_50_C4_24k_moco.yaml``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from mocolab.config import ConfigError, absolute_tracking_uri, default_tracking_uri
from mocolab.weights_io.arch import guess_arch
from mocolab.weights_io.detectron2 import write_detectron2
from mocolab.weights_io.layouts import BackboneWeights

FORMATS = ("torchvision", "detectron2")


def read_source(pretrain_run: str | None, weights: str | None, tracking_uri: str) -> tuple[str, BackboneWeights]:
    """``(what it is, the backbone)`` of a pretraining run's ``backbone.pt`` or of a weights file."""
    from mocolab.weights_io.files import backbone_weights, load_backbone_weights

    if pretrain_run:
        from mocolab.tracking import load_pretrain_artifacts

        where = f"--pretrain-run {pretrain_run}"
        return where, backbone_weights(load_pretrain_artifacts(tracking_uri, pretrain_run)[1], where)
    where = f"--weights {weights}"
    return where, load_backbone_weights(weights, where)


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


def export(weights: BackboneWeights, fmt: str, out: Path, where: str) -> str:
    """Write ``weights`` to ``out`` in ``fmt``; returns a line saying what was written."""
    if fmt == "detectron2":
        arch = check_detectron2(weights.state, where)
        write_detectron2(weights.state, out)
        return f"{arch}, {len(weights.state)} arrays -> {out} (detectron2: MODEL.WEIGHTS {out})"
    tmp = out.with_name(out.name + ".tmp")
    torch.save(weights.state, tmp)
    os.replace(tmp, out)
    return f"{len(weights.state)} tensors -> {out} (torchvision keys, no fc.*)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pretrain-run", metavar="RUN_ID", help="MLflow id of a finished pretraining run")
    source.add_argument("--weights", metavar="PATH", help="a weights file of any layout --weights of lincls reads")
    parser.add_argument("--format", choices=FORMATS, required=True, help="torchvision state_dict or detectron2 .pkl")
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
    where, weights = read_source(args.pretrain_run, args.weights, uri)
    written = export(weights, args.format, out, where)
    print(f"[mocolab export] {where}: {weights.summary()}; {written}")
    return 0
