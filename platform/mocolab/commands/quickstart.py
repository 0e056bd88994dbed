"""``mocolab quickstart [--seed N] [--set KEY=VALUE ...]``: the quickstart config, pretrained and evaluated, then
compared with random init in one table."""

from __future__ import annotations

import argparse

from mocolab.cli import add_overrides_argument
from mocolab.quickstart import format_table, quickstart_config, run_quickstart
from mocolab.tracking.masking import redact


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=None, help="train.seed (default: the config's)")
    add_overrides_argument(parser, "override a key of experiments/pretrain/quickstart.yaml (repeatable)")


def main(args: argparse.Namespace) -> int:
    cfg = quickstart_config(args.seed, args.overrides)
    run_id, rows = run_quickstart(cfg)
    print(f"\nquickstart: run '{cfg.tracking.run_name}' (MLflow run {run_id}, {redact(cfg.tracking.tracking_uri)})")
    print(format_table(rows))
    return 0
