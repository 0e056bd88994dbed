"""The console of a real ``mocolab pretrain`` on a local Ray, as a user sees it: mocolab's lines each once and none
of Ray's internals unless ``--verbose``; progress bars in a terminal. The same command on a started cluster (through
``ray job submit``, whose log stream is no terminal) is checked in test_cluster_jobs.py."""

from __future__ import annotations

import subprocess

import pytest
from console_output import chatter, progress_lines, run_in_terminal
from image_folders import make_folder
from local_servers import VENV_BIN, clean_env
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

TINY_FOLDER = [
    "data.dataset=folder",
    "data.image_size=16",
    "train.epochs=2",
    "train.batch_size=8",
    "moco.queue_size=64",
    "data.loader_workers=0",
    "tracking.experiment=console",
]


def pretrain(tmp_path, *extra: str, terminal: bool = False) -> str:
    """``mocolab pretrain`` of the quickstart config on a folder of images, in a fresh process (its own local Ray),
    its output going to a pipe or to a terminal."""
    args = [str(VENV_BIN / "mocolab"), "pretrain", "quickstart.yaml", "--set", f"data.root={tmp_path / 'photos'}"]
    for item in TINY_FOLDER:
        args += ["--set", item]
    if terminal:
        code, logs = run_in_terminal([*args, *extra], tmp_path, clean_env(), timeout_s=900)
    else:
        out = subprocess.run(
            [*args, *extra], cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=900
        )
        code, logs = out.returncode, out.stdout + out.stderr
    assert code == 0, logs[-5000:]
    return logs


@pytest.fixture
def workdir(tmp_path):
    from mocolab.quickstart import QUICKSTART_CONFIG

    make_folder(tmp_path / "photos", n=40)
    (tmp_path / "quickstart.yaml").write_text(QUICKSTART_CONFIG.read_text())
    return tmp_path


def test_default_console_shows_mocolab_lines_once_and_no_ray_internals(workdir):
    logs = pretrain(workdir)

    assert chatter(logs) == []
    lines = progress_lines(logs)
    assert len(lines) == len(set(lines)), lines
    epochs = [line for line in lines if line.startswith("[mocolab] epoch")]
    assert [line.split()[2] for line in epochs] == ["1/2", "2/2"]
    assert not any("img/s:" in line for line in lines)  # no terminal: no bars redrawn into the log
    assert sum("kNN monitor off" in line for line in lines) == 1
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("console").experiment_id])
    assert run.info.status == "FINISHED" and "knn_top1" not in run.data.metrics


def test_a_terminal_gets_a_bar_per_epoch_and_verbose_brings_ray_back(workdir):
    logs = pretrain(workdir, "--verbose", terminal=True)

    bars = [line for line in progress_lines(logs) if "img/s:" in line]
    assert [bar.split("epoch ")[1][:3] for bar in bars] == ["1/2", "2/2"], bars  # each finished bar once
    assert all("100%" in bar and "2.00/2.00" in bar for bar in bars), bars  # 40 images / (2 workers x 8)
    shown = " ".join(chatter(logs))
    assert "training worker group" in shown and "TrainingReport(" in shown
