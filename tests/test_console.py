"""mocolab's console without Ray: the bar's text and update rate, verbosity, the Ray job's environment, and
``mocolab config``."""

from __future__ import annotations

import json
import logging
import os

import pytest
import yaml

from mocolab import console
from mocolab.cli import main
from mocolab.config import build_config, load_config
from mocolab.runtime import ray_job_env


class RecordingBar:
    """Stands in for Ray's distributed tqdm: records every state the worker would send."""

    instances: list[RecordingBar] = []

    def __init__(self, desc, total, unit, flush_interval_s):
        self.desc, self.total, self.n, self.sent, self.closed = desc, total, 0, [], False
        RecordingBar.instances.append(self)

    def set_description(self, desc):
        self.desc = desc
        self.sent.append((self.n, desc))

    def close(self):
        self.closed = True


@pytest.fixture
def bars(monkeypatch):
    import ray.experimental.tqdm_ray

    monkeypatch.setenv(console.PROGRESS_ENV, "bar")
    RecordingBar.instances = []
    monkeypatch.setattr(ray.experimental.tqdm_ray, "tqdm", RecordingBar)
    return RecordingBar.instances


def test_describe_shows_loss_lr_and_images_per_second():
    assert console.describe("epoch 3/200", 6.12345, 0.03, 812.4) == "epoch 3/200  loss 6.1235  lr 0.03  812 img/s"
    assert console.describe("detect", None, None, 1234.0) == "detect  1,234 img/s"


def test_updates_are_sent_at_most_every_refresh_interval_then_the_final_state(bars, monkeypatch):
    clock = iter(i * 0.1 for i in range(1000))  # 0.1 s between calls to perf_counter
    monkeypatch.setattr(console.time, "perf_counter", lambda: next(clock))
    with console.StepProgress("epoch 1/2", total=20) as bar:
        for step in range(20):
            bar.step(images=64, loss=5.0 - 0.1 * step, lr=0.03)
    (recorded,) = bars
    steps = [n for n, _ in recorded.sent]
    assert recorded.closed and steps[-1] == 20 and recorded.total == 20
    assert len(steps) <= 20 * 0.1 / console.REFRESH_S + 2  # not every step
    assert steps == sorted(steps) and "loss" in recorded.sent[-1][1] and "img/s" in recorded.sent[-1][1]


def test_without_a_terminal_progress_is_a_line_a_minute(bars, monkeypatch, capfd):
    monkeypatch.setenv(console.PROGRESS_ENV, "lines")
    clock = iter(range(0, 10_000, 10))  # 10 s a step
    monkeypatch.setattr(console.time, "perf_counter", lambda: next(clock))
    with console.StepProgress("epoch 2/9", total=30) as bar:
        for _step in range(30):
            bar.step(images=100, loss=4.0, lr=0.5)
    lines = capfd.readouterr().out.splitlines()
    assert bars == [] and len(lines) == 30 * 10 // console.LINE_EVERY_S  # one a minute, none at close
    assert lines[0] == "[mocolab] epoch 2/9  step 6/30  loss 4.0000  lr 0.5  10 img/s  ETA 0:04:00"


def test_progress_follows_the_console_unless_the_driver_chose(monkeypatch):
    monkeypatch.delenv(console.PROGRESS_ENV, raising=False)
    monkeypatch.setattr(console.sys.stderr, "isatty", lambda: True, raising=False)
    assert console.progress_mode() == "bar"
    monkeypatch.setattr(console.sys.stderr, "isatty", lambda: False, raising=False)
    assert console.progress_mode() == "lines"
    monkeypatch.setenv(console.PROGRESS_ENV, "bar")  # what a worker gets from the driver
    assert console.progress_mode() == "bar"


def test_an_inactive_bar_sends_nothing(bars):
    with console.StepProgress("epoch 1/2", total=5, active=False) as bar:
        bar.step(images=8, loss=1.0, lr=0.1)
    assert bars == []


def test_verbosity_sets_mlflow_level_unless_the_user_did(monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, "0")  # restored after the test, as are the next two
    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    monkeypatch.setattr(logging.getLogger("mlflow"), "level", logging.getLogger("mlflow").level)
    console.set_verbose(False)
    assert not console.is_verbose() and logging.getLogger("mlflow").level == logging.WARNING
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"  # no download bars before an evaluation
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "DEBUG")
    console.set_verbose(True)
    assert console.is_verbose() and logging.getLogger("mlflow").level == logging.DEBUG


def test_ray_job_env_quiets_train_and_names_the_cluster(monkeypatch):
    for key in (
        "RAY_TRAIN_ENABLE_PRINT_PATCH",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",
        "RAY_worker_niceness",
        "RAY_JOB_CONFIG_JSON_ENV_VAR",
    ):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    monkeypatch.setenv(console.PROGRESS_ENV, "lines")
    env = ray_job_env("127.0.0.1:6379")
    assert env["RAY_ADDRESS"] == "127.0.0.1:6379" and env[console.PROGRESS_ENV] == "lines"
    assert env["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0" and env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert env[console.VERBOSE_ENV] == "0" and env["RAY_worker_niceness"] == "0"
    assert "RAY_ADDRESS" not in ray_job_env("auto")
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PRINT_PATCH", "1")  # the user's choice wins
    submitted = {"runtime_env": {"env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(submitted))  # what `ray job submit` sets
    env = ray_job_env("10.0.0.1:6379")
    assert env["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "1"
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in env  # left to the job's own env: Ray refuses a clash


def test_mocolab_config_prints_the_resolved_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("moco: {version: v1}\ndata: {dataset: folder, root: photos}\n")
    code = main(["config", "c.yaml", "--set", "tracking.run_name=r1", "--set",
                 "tracking.tracking_uri=https://alice:pw-123@mlflow.example"])  # fmt: skip
    printed = yaml.safe_load(capsys.readouterr().out)
    assert code == 0
    assert printed["moco"]["temperature"] == 0.07 and printed["train"]["schedule"] == "step"  # the v1 preset
    assert printed["data"]["root"] == str(tmp_path / "photos")
    assert printed["tracking"]["tracking_uri"] == "https://***@mlflow.example"
    assert (
        build_config(printed).model_dump()
        == load_config(
            tmp_path / "c.yaml", ["tracking.run_name=r1", "tracking.tracking_uri=https://***@mlflow.example"]
        ).model_dump()
    )
