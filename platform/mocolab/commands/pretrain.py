"""``mocolab pretrain CONFIG [--set KEY=VALUE ...]``: pre-flight, pretraining, then the evaluations it names."""

from __future__ import annotations

import argparse

from mocolab.cli import add_overrides_argument
from mocolab.config import load_config
from mocolab.orchestrate import run_pretrain


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (see experiments/pretrain/)")
    add_overrides_argument(parser)


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    run_id = run_pretrain(cfg)
    print(f"[mocolab] run '{cfg.tracking.run_name}' finished: MLflow run {run_id}", flush=True)
    return 0
