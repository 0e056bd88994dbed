"""``mocolab export (--pretrain-run ID | --weights PATH) --format torchvision|detectron2|timm --out FILE``."""

from __future__ import annotations

import argparse
from pathlib import Path

from mocolab.config import ConfigError, absolute_tracking_uri, build_config, default_tracking_uri
from mocolab.tracking.artifacts import load_pretrain_artifacts
from mocolab.weights_io.export import FORMATS, TimmModel, export, timm_model_of
from mocolab.weights_io.files import backbone_weights, read_weights_file
from mocolab.weights_io.layouts import BackboneWeights


def read_source(
    pretrain_run: str | None, weights: str | None, tracking_uri: str
) -> tuple[str, BackboneWeights, TimmModel | None]:
    """``(what it is, the backbone, its timm model or None)`` of a pretraining run's ``backbone.pt`` (the timm
    model from its config) or of a weights file (from the file, if ``--format timm`` wrote it)."""
    if pretrain_run:
        where = f"--pretrain-run {pretrain_run}"
        config, content = load_pretrain_artifacts(tracking_uri, pretrain_run, read_weights_file)
        return where, backbone_weights(content, where), timm_model_of(build_config(config))
    where = f"--weights {weights}"
    content = read_weights_file(weights, where)
    named = isinstance(content, dict) and isinstance(content.get("model"), str)
    named = named and isinstance(content.get("kwargs"), dict)
    return where, backbone_weights(content, where), TimmModel(content["model"], content["kwargs"]) if named else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pretrain-run", metavar="RUN_ID", help="MLflow id of a finished pretraining run")
    source.add_argument("--weights", metavar="PATH", help="a weights file of any layout --weights of lincls reads")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        required=True,
        help="torchvision state_dict, detectron2 .pkl or timm (model name, kwargs, state_dict)",
    )
    parser.add_argument("--out", metavar="FILE", required=True, help="the file to write")
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow store of --pretrain-run (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )


def main(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    if out.is_dir():
        raise ConfigError(
            f"--out {args.out} is a folder; give the file to write, e.g. --out {Path(args.out) / 'backbone.pth'}"
        )
    if not out.parent.is_dir():
        raise ConfigError(f"--out {args.out}: the folder {out.parent} does not exist; create it or write elsewhere")
    uri = absolute_tracking_uri(args.tracking_uri or default_tracking_uri(), Path.cwd())
    where, weights, model = read_source(args.pretrain_run, args.weights, uri)
    written = export(weights, args.format, out, where, model)
    print(f"[mocolab export] {where}: {weights.summary()}; {written}")
    return 0
