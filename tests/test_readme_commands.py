"""The README's cluster commands as the end-to-end cluster test reads them (fast: no cluster)."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from readme_commands import job_commands, readme_job_commands

from mocolab.cli import SUBCOMMANDS
from mocolab.config import load_config

REPO = Path(__file__).resolve().parents[1]


def test_the_readme_submits_pretraining_linear_eval_and_a_sweep():
    commands = readme_job_commands(REPO)
    assert set(commands) == {"pretrain", "lincls", "sweep"}
    for command in commands.values():
        assert "--address" in command.submit and "--working-dir" in command.submit
        parser = argparse.ArgumentParser(exit_on_error=False)
        importlib.import_module(SUBCOMMANDS[command.subcommand][0]).add_arguments(parser)
        args = parser.parse_args(command.entrypoint[2:])  # the subcommand's own parser takes every argument
        assert args.overrides


@pytest.mark.parametrize("subcommand", ["pretrain", "lincls"])
def test_the_readme_configs_load_once_the_bucket_is_named(subcommand):
    command = readme_job_commands(REPO)[subcommand]
    argv = command.argv({"BUCKET": "my-bucket", "RUN_ID": "0123abcd"})
    entry = argv[argv.index("--") + 1 :]
    overrides = [entry[i + 1] for i, arg in enumerate(entry) if arg == "--set"]
    cfg = load_config(REPO / entry[2], overrides)
    assert cfg.data.root == "s3://my-bucket/mocolab/data/imagenet"
    assert cfg.scaling.storage_path == "s3://my-bucket/mocolab/ray_results"


def test_placeholders_are_whole_words_and_the_config_is_replaceable():
    (command,) = job_commands(
        "## Running on a Ray cluster (AWS)\n```bash\n"
        "ray job submit --address http://127.0.0.1:8265 \\\n  -- mocolab sweep a.yaml --set x=s3://BUCKET/p "
        "--set y=BUCKETS  # a comment\n```\n## Next\n```bash\nray job submit -- mocolab pretrain b.yaml\n```\n"
    )
    argv = command.argv({"BUCKET": "b1", "http://127.0.0.1:8265": "http://127.0.0.1:9"}, config="/tmp/s.yaml")
    assert argv == ["ray", "job", "submit", "--address", "http://127.0.0.1:9", "--", "mocolab", "sweep",
                    "/tmp/s.yaml", "--set", "x=s3://b1/p", "--set", "y=BUCKETS"]  # fmt: skip


def readme_mocolab_commands(readme: str) -> list[list[str]]:
    """Every ``mocolab`` (or ``.venv/bin/mocolab``) command line in README.md's fenced bash blocks, split like the
    shell; ``ray job submit`` entrypoints are the cluster test's."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv and Path(argv[0]).name == "mocolab":
                found.append(argv[1:])
    return found


README_COMMANDS = readme_mocolab_commands((REPO / "README.md").read_text())
QUICK = {("config",), ("sweep", "--dry-run"), ("reproduce", "--list")}  # run; the others are parsed and loaded


def is_quick(argv: list[str]) -> bool:
    return any(argv[0] == name and all(flag in argv for flag in flags) for name, *flags in QUICK)


def test_the_readme_shows_quick_commands_to_run():
    assert sum(map(is_quick, README_COMMANDS)) >= 3


@pytest.mark.parametrize("argv", [a for a in README_COMMANDS if is_quick(a)], ids=" ".join)
def test_each_quick_readme_command_runs_as_written(argv, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    result = subprocess.run(
        [sys.executable, "-m", "mocolab.cli", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()


@pytest.mark.parametrize("argv", [a for a in README_COMMANDS if not is_quick(a)], ids=" ".join)
def test_each_other_readme_command_parses_and_its_config_file_exists(argv):
    parser = argparse.ArgumentParser(exit_on_error=False)
    importlib.import_module(SUBCOMMANDS[argv[0]][0]).add_arguments(parser)
    args = parser.parse_args(argv[1:])
    for value in vars(args).values():
        if isinstance(value, str) and value.endswith(".yaml"):
            assert (REPO / value).is_file(), value
