"""The README's cluster commands as the end-to-end cluster test reads them (fast: no cluster)."""

from __future__ import annotations

import argparse
import importlib
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
    entry = argv[argv.index("--") + 1:]
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
