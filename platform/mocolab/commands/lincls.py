"""``mocolab lincls CONFIG (--pretrain-run ID | --weights PATH | --init random|supervised) [--fast]``."""

from __future__ import annotations

import argparse

from mocolab.cli import add_source_arguments
from mocolab.config import load_config
from mocolab.evaluate.lincls import metric_names
from mocolab.evaluate.pipeline import run_lincls, with_lincls
from mocolab.evaluate.weights import resolve_source
from mocolab.preflight import preflight


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    parser.add_argument("--fast", action="store_true", help="train on features extracted once (eval.lincls.fast)")


def main(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + (["eval.lincls.fast=true"] if args.fast else [])
    cfg = with_lincls(load_config(args.config, overrides))
    source = resolve_source(cfg, args.pretrain_run, args.weights, args.init)
    preflight(cfg, ("lincls",), source=source)
    metrics = run_lincls(cfg, source)
    top1, top5 = metric_names(cfg.eval.lincls.fast)
    print(
        f"[mocolab lincls] {source.label}: top-1 {metrics[top1]:.2f}%  top-5 {metrics[top5]:.2f}%  "
        f"(MLflow run {metrics['run_id']})"
    )
    return 0
