"""``mocolab config [CONFIG] [--set KEY=VALUE ...]``: the config as a run would use it, in YAML.

It goes through the same loading as every command (the ``moco.version`` preset, ``--set`` overrides, paths made
absolute, a fresh ``tracking.run_name`` when none is given), so what it prints is what the MLflow params show.
"""

from __future__ import annotations

import argparse

from mocolab.cli import add_overrides_argument
from mocolab.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (default: the schema's defaults)")
    add_overrides_argument(parser)


def main(args: argparse.Namespace) -> int:
    from mocolab.tracking.masking import redact

    print(redact(load_config(args.config, args.overrides).to_yaml()), end="")
    return 0
