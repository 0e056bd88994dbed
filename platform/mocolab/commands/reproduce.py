"""``mocolab reproduce [CLAIM ...] [--list | --dry-run] [--seeds N] [--resume [NAME]] [--out DIR] [--set ...]``."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from mocolab.analysis.runs import resolve_uri
from mocolab.cli import add_overrides_argument
from mocolab.config import ConfigError, new_run_name
from mocolab.reproduce.claims import CLAIMS_DIR, list_claims
from mocolab.reproduce.run import DEFAULT_EXPERIMENT, find_parent, plan_claim, plan_text, reproduce
from mocolab.tracking.masking import redact
from mocolab.tracking.names import STAGE_REPRODUCE


def command_text(args: argparse.Namespace, claims: list[str]) -> str:
    """The command line that makes this reproduction (``--resume`` and ``--out`` left out)."""
    parts = ["mocolab", "reproduce", *claims]
    if args.seeds is not None:
        parts += ["--seeds", str(args.seeds)]
    if args.experiment != DEFAULT_EXPERIMENT:
        parts += ["--experiment", args.experiment]
    for override in args.overrides:
        parts += ["--set", override]
    return redact(" ".join(map(shlex.quote, parts)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("claims", nargs="*", metavar="CLAIM", help=f"claims to run (default: all in {CLAIMS_DIR})")
    parser.add_argument("--list", action="store_true", help="list the claims with their trials and expected time")
    parser.add_argument("--dry-run", action="store_true", help="validate every claim and trial, print the plan, stop")
    parser.add_argument("--seeds", type=int, help="seeds 0..N-1 for every setting (default: the claim files', 3)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="",
        metavar="NAME",
        help="continue the newest (or the named) reproduction: finished claims are read back",
    )
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment (default: reproduce)")
    parser.add_argument("--out", type=Path, help="report folder (default: reports/<reproduction name>/)")
    add_overrides_argument(parser, "override a key of every claim's base run config (repeatable)")


def main(args: argparse.Namespace) -> int:
    if args.seeds is not None and args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds}: give at least 1 (the claims need >= 3 for a verdict)")
    seeds = list(range(args.seeds)) if args.seeds is not None else None
    parent = None
    if args.resume is not None:
        parent = find_parent(resolve_uri(), args.experiment, args.resume or None)
        if parent is None:
            raise ConfigError(
                f"--resume: no reproduction {args.resume or ''} in experiment '{args.experiment}'; drop --resume"
            )
    run_name = parent.info.run_name if parent else new_run_name(STAGE_REPRODUCE)
    names = args.claims or (parent.data.params["claims"].split(",") if parent else list_claims())
    plans = [plan_claim(name, run_name, seeds, args.overrides, args.experiment) for name in names]
    command = command_text(args, names if args.claims else [])
    print(f"reproduction '{run_name}': {len(plans)} claim(s), all trial configs valid\n{plan_text(plans)}", flush=True)
    if args.list or args.dry_run:
        return 0
    return reproduce(plans, parent, run_name, names, seeds, command, args.experiment, args.out)
