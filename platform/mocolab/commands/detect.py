"""``mocolab detect CONFIG (--pretrain-run ID | --weights PATH | --init random|supervised)``."""

from __future__ import annotations

import argparse

from mocolab.cli import add_source_arguments
from mocolab.config import load_config
from mocolab.evaluate.pipeline import run_detection
from mocolab.evaluate.weights import resolve_source
from mocolab.preflight import preflight


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    source = resolve_source(cfg, args.pretrain_run, args.weights, args.init)
    preflight(cfg, ("detection",), source=source)
    metrics = run_detection(cfg, source)
    print(
        f"[mocolab detect] {source.label}: AP {metrics['det_AP']:.2f}  AP50 {metrics['det_AP50']:.2f}  "
        f"AP75 {metrics['det_AP75']:.2f}  (percent; train {metrics['det_train_s']:.0f} s, "
        f"MLflow run {metrics['run_id']})"
    )
    return 0
