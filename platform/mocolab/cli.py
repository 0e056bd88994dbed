"""``mocolab`` command line: thin subcommands that parse arguments and call the modules that do the work.

Each subcommand lives in the module that owns its work and exposes ``add_arguments(parser)`` and
``main(args) -> int``; this file only lists them, so ``mocolab --help`` stays fast (nothing heavy is
imported until a subcommand runs).
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "pretrain": ("mocolab.orchestrate", "MoCo pretraining on Ray Train (resumes a run of the same name)"),
    "quickstart": ("mocolab.quickstart", "pretrain on bundled digits, then kNN/linear/detection vs random init"),
    "lincls": ("mocolab.evaluate.lincls_cli", "linear classification on frozen features (the paper's protocol)"),
    "detect": ("mocolab.evaluate.detection_cli", "Faster R-CNN transfer, COCO-style AP"),
    "sweep": ("mocolab.tune.sweep", "Ray Tune sweep from a sweep file (experiments/sweeps/)"),
    "report": ("mocolab.analysis.report", "ablation tables, plots and a markdown report from MLflow"),
    "reproduce": ("mocolab.reproduce.cli", "the MoCo papers' claims at CPU scale over seeds, with verdicts and a report"),
    "bench": ("mocolab.bench.cli", "step, reference-loop, data-pipeline and overhead benchmarks"),
    "export": ("mocolab.weights_io.export", "write a backbone as torchvision keys or a detectron2 .pkl"),
    "config": ("mocolab.config_cli", "print a config as it resolves (preset, --set overrides, absolute paths) in YAML"),
}
VERBOSE_HELP = "also show Ray's and MLflow's informational output (start-up, worker groups, reports); Ray's log files keep it either way"


def add_overrides_argument(parser: argparse.ArgumentParser, help: str = "override a config key, e.g. "
                           "--set moco.temperature=0.2 (repeatable)") -> None:
    """The ``--set KEY=VALUE`` option every config-taking subcommand shares (collected in ``args.overrides``)."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mocolab", description="MoCo pretraining, sweeps and analysis on Ray + MLflow")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # Arguments are added lazily (see main) so that --help of the top level imports nothing heavy.
    return parser


def _shutdown_ray() -> None:
    """Stop (or disconnect from) the Ray a subcommand started, so that no trainer actor outlives the command."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if argv and argv[0] in SUBCOMMANDS:
        from mocolab.console import set_verbose

        set_verbose("--verbose" in argv[1:])  # before the subcommand imports MLflow; argparse checks it below
        module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
        sub = argparse.ArgumentParser(prog=f"mocolab {argv[0]}", description=SUBCOMMANDS[argv[0]][1])
        module.add_arguments(sub)
        sub.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
        args = sub.parse_args(argv[1:])
        from mocolab.config import ConfigError
        from mocolab.train.nonfinite import NonFiniteLossError

        try:
            return int(module.main(args) or 0)
        except ConfigError as err:
            print(f"mocolab {argv[0]}: {err}", file=sys.stderr)
            return 2
        except NonFiniteLossError as err:  # the run is already marked FAILED with where it happened
            print(f"mocolab {argv[0]}: {err}", file=sys.stderr)
            return 1
        finally:
            _shutdown_ray()
    parser.parse_args(argv)
    return 2


if __name__ == "__main__":
    sys.exit(main())
