"""``mocolab`` command line: thin subcommands that parse arguments and call the modules that do the work.

Each subcommand lives in the module that owns its work and exposes ``add_arguments(parser)`` and
``main(args) -> int``; this file only lists them, so ``mocolab --help`` stays fast (nothing heavy is
imported until a subcommand runs). It is also where every command ends: a user error (ConfigError) is one
line and exit 2, Ctrl-C is one line (with the command that resumes an interrupted run) and exit 130, any other
error is one line and exit 1 with the full traceback written to a log file; all of it with credentials masked.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

SUBCOMMANDS = {
    "pretrain": ("mocolab.commands.pretrain", "MoCo pretraining on Ray Train (resumes a run of the same name)"),
    "quickstart": (
        "mocolab.commands.quickstart",
        "pretrain on bundled digits, then kNN/linear/detection vs random init",
    ),
    "lincls": ("mocolab.commands.lincls", "linear classification on frozen features (the paper's protocol)"),
    "detect": ("mocolab.commands.detect", "Faster R-CNN transfer, COCO-style AP"),
    "sweep": ("mocolab.commands.sweep", "Ray Tune sweep from a sweep file (experiments/sweeps/)"),
    "report": ("mocolab.commands.report", "ablation tables, plots and a markdown report from MLflow"),
    "reproduce": (
        "mocolab.commands.reproduce",
        "the MoCo papers' claims at CPU scale over seeds, with verdicts and a report",
    ),
    "bench": ("mocolab.commands.bench", "step, reference-loop, data-pipeline and overhead benchmarks"),
    "export": ("mocolab.commands.export", "write a backbone as torchvision keys or a detectron2 .pkl"),
    "config": (
        "mocolab.commands.config",
        "print a config as it resolves (preset, --set overrides, absolute paths) in YAML",
    ),
}
VERBOSE_HELP = (
    "also show Ray's and MLflow's informational output (start-up, worker groups, reports, Ray Tune's tables of a "
    "sweep's trials); Ray's log files keep it either way"
)


def add_overrides_argument(
    parser: argparse.ArgumentParser, help: str = "override a config key, e.g. --set moco.temperature=0.2 (repeatable)"
) -> None:
    """The ``--set KEY=VALUE`` option every config-taking subcommand shares (collected in ``args.overrides``)."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that choose an evaluated backbone (shared by ``lincls`` and ``detect``), and ``--set``."""
    parser.add_argument("config", help="the Config YAML (settings under eval.lincls / eval.detection)")
    parser.add_argument("--pretrain-run", metavar="RUN_ID", help="MLflow id of a finished pretraining run")
    parser.add_argument(
        "--weights",
        metavar="PATH",
        help="backbone weights: mocolab backbone.pt/checkpoint.pt, official MoCo .pth.tar, solo-learn, lightly, "
        "torchvision/timm ResNet or detectron2 .pkl (the layout is detected)",
    )
    parser.add_argument(
        "--init",
        choices=("random", "supervised"),
        help="baseline: random init, or supervised (with --weights: torchvision's ImageNet weights file)",
    )
    add_overrides_argument(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mocolab", description="MoCo pretraining, sweeps and analysis on Ray + MLflow"
    )
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


RUN_NAME_OVERRIDE = "tracking.run_name="


def resume_command(argv: list[str], run_name: str) -> str:
    """The command line (``mocolab`` + ``argv``) that resumes run ``run_name``: the same arguments with their
    ``--set tracking.run_name=...`` replaced by ``run_name``'s."""
    kept: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == "--set" and i + 1 < len(argv) and argv[i + 1].startswith(RUN_NAME_OVERRIDE):
            skip = True
        elif not arg.startswith("--set=" + RUN_NAME_OVERRIDE):
            kept.append(arg)
    return shlex.join(["mocolab", *kept, "--set", RUN_NAME_OVERRIDE + run_name])


def write_error_log(command: str, err: BaseException, redact) -> Path:
    """The full traceback of ``err``, passed through ``redact``, in a new file under the temp folder."""
    folder = Path(tempfile.gettempdir()) / "mocolab-errors"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    path.write_text(redact("".join(traceback.format_exception(err))))
    return path


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _run(command: str, module, args: argparse.Namespace, argv: list[str]) -> int:
    """Run a subcommand's ``main`` and turn how it ended into one masked line and an exit code."""
    from mocolab.config import ConfigError
    from mocolab.tracking.masking import redact
    from mocolab.train.nonfinite import NonFiniteLossError
    from mocolab.train.resume import NoLoadableCheckpointError

    def say(text: str) -> None:
        print(f"mocolab {command}: {redact(text)}", file=sys.stderr, flush=True)

    try:
        return int(module.main(args) or 0)
    except ConfigError as err:
        say(str(err))
        return 2
    except (NonFiniteLossError, NoLoadableCheckpointError) as err:  # the run is already FAILED, saying why
        say(str(err))
        return 1
    except KeyboardInterrupt as err:
        run_name: str | None = getattr(err, "run_name", None)
        resume = f"; resume it with: {resume_command(argv, run_name)}" if run_name else ""
        say(f"{err or 'interrupted'}{resume}")
        return 130
    except Exception as err:
        log = write_error_log(command, err, redact)
        say(f"{type(err).__name__}: {_last_line(str(err))} (full traceback, credentials masked: {log})")
        return 1


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
        try:
            return _run(argv[0], module, args, argv)
        finally:
            _shutdown_ray()
    parser.parse_args(argv)
    return 2


if __name__ == "__main__":
    sys.exit(main())
