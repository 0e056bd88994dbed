"""``mocolab report SWEEP_NAME | --experiment NAME``: ablation table, plots and a markdown report."""

from __future__ import annotations

import argparse
from pathlib import Path

from mocolab.analysis.report import make_report, terminal_text
from mocolab.analysis.runs import resolve_uri


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", nargs="?", help="sweep name (the sweep file's 'name:')")
    parser.add_argument("--experiment", help="report an MLflow experiment's pretraining runs instead")
    parser.add_argument("--out", type=Path, help="report folder (default reports/<name>/)")
    parser.add_argument(
        "--metric",
        dest="metrics",
        action="append",
        default=[],
        help="metric to tabulate (repeatable; first = primary; default: knn_top1, lincls_top1, det_AP, ... present)",
    )
    parser.add_argument("--tracking-uri", help="MLflow store (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--no-log", action="store_true", help="do not log the report to the sweep's parent run")


def main(args: argparse.Namespace) -> int:
    uri = resolve_uri(args.tracking_uri)
    s, out = make_report(uri, args.sweep, args.experiment, args.out, args.metrics, log_to_parent=not args.no_log)
    print(terminal_text(s))
    print(f"report: {out / 'report.md'}")
    return 0
