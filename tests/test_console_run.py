"""The console of a real ``mocolab pretrain`` on a local Ray, as a user sees it: progress bars and mocolab's lines,
each once, and none of Ray's internals unless ``--verbose``. The same command on a started cluster is checked in
test_cluster_jobs.py."""

from __future__ import annotations

import subprocess

import pytest
from console_output import chatter, progress_lines
from local_servers import VENV_BIN, clean_env
from mlflow import MlflowClient

from test_data_folder import make_folder

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


def pretrain(tmp_path, *extra: str) -> str:
    """``mocolab pretrain`` of the quickstart config on a folder of images, in a fresh process (its own local Ray)."""
    args = [str(VENV_BIN / "mocolab"), "pretrain", "quickstart.yaml", "--set", f"data.root={tmp_path / 'photos'}"]
    for item in TINY_FOLDER:
        args += ["--set", item]
    out = subprocess.run([*args, *extra], cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=900)
    logs = out.stdout + out.stderr
    assert out.returncode == 0, logs[-5000:]
    return logs


@pytest.fixture
def workdir(tmp_path):
    from mocolab.quickstart import QUICKSTART_CONFIG

    make_folder(tmp_path / "photos", n=40)
    (tmp_path / "quickstart.yaml").write_text(QUICKSTART_CONFIG.read_text())
    return tmp_path


def test_default_console_shows_progress_once_and_no_ray_internals(workdir):
    logs = pretrain(workdir)

    assert chatter(logs) == []
    lines = progress_lines(logs)
    assert len(lines) == len(set(lines)), lines
    epochs = [line for line in lines if line.startswith("[mocolab] epoch")]
    assert [line.split()[2] for line in epochs] == ["1/2", "2/2"]
    bars = [line for line in lines if "img/s:" in line]
    assert len(bars) == 2 and all("100%" in bar and "2.00/2.00" in bar for bar in bars), bars  # 40 images / 16
    assert sum("kNN monitor off" in line for line in lines) == 1
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("console").experiment_id])
    assert run.info.status == "FINISHED" and "knn_top1" not in run.data.metrics


def test_verbose_brings_ray_back(workdir):
    logs = pretrain(workdir, "--verbose")
    shown = " ".join(chatter(logs))
    assert "training worker group" in shown and "TrainingReport(" in shown
