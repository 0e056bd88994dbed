"""``mocolab sweep SWEEP_FILE [--resume] [--name NAME] [--dry-run] [--set KEY=VALUE ...]``."""

from __future__ import annotations

import argparse

from mocolab.cli import add_overrides_argument
from mocolab.preflight import configured_stages, preflight
from mocolab.tune.spec import load_sweep
from mocolab.tune.sweep import count_trials, run_sweep


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_file", help="sweep YAML (experiments/sweeps/)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    add_overrides_argument(parser, "override a key of the base run config for every trial (repeatable)")
    parser.add_argument("--name", help="run the sweep under another name (the file's name: otherwise)")
    parser.add_argument("--dry-run", action="store_true", help="validate every trial config and stop")


def main(args: argparse.Namespace) -> int:
    spec, base, checked = load_sweep(args.sweep_file, args.overrides, name=args.name)
    cfg = checked[0]
    preflight(checked, configured_stages(cfg), concurrent=min(spec.max_concurrent_trials, count_trials(spec)))
    print(f"sweep '{spec.name}': {count_trials(spec)} trial(s) over {spec.axes or ['seeds']}, all configs valid")
    if args.dry_run:
        return 0
    from mocolab.runtime import ensure_ray

    ensure_ray()
    parent_run_id, failed, unfinished = run_sweep(spec, base, cfg, resume=args.resume)
    if unfinished:
        print(
            f"sweep '{spec.name}' interrupted with {unfinished} unfinished trial(s); continue it with "
            f"mocolab sweep {args.sweep_file} --resume"
        )
        return 1
    print(
        f"sweep '{spec.name}' done: MLflow parent run {parent_run_id}, {failed} failed trial(s); "
        f"tables and plots: mocolab report {spec.name}"
    )
    return 1 if failed else 0
