"""Sweeps on Ray Tune (slow): one MLflow child run per trial, a failed trial recorded and the sweep going
on, and a sweep killed mid-way then resumed with exactly one MLflow run per trial."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from mlflow import MlflowClient
from tiny_sweep import write_sweep

from mocolab import tracking
from mocolab.analysis.runs import find_sweep_parent
from mocolab.tune.spec import load_sweep
from mocolab.tune.sweep import run_sweep

pytestmark = pytest.mark.slow


def children(uri: str, sweep: str) -> list:
    parent = find_sweep_parent(uri, sweep)
    return tracking.child_runs(uri, "sweeps", parent["run_id"])


def make_image_folder(root: Path) -> Path:
    """Two classes of 16x16 PNGs (train 2 x 24, test 2 x 8) and one unreadable file in the test split."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("test", 8)):
        for label, cls in enumerate(("a", "b")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                image = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
                image[4 * label : 4 * label + 8] += 150  # a class-dependent band
                cv2.imwrite(str(folder / f"{i}.png"), image)
    (root / "test" / "a" / "broken.png").write_bytes(b"not a png")
    return root


def test_sweep_runs_one_child_run_per_trial_and_goes_on_after_a_failed_trial(ray_local, mlflow_uri, tmp_path):
    # the kNN monitor reads the broken test image: data.on_corrupt=fail makes that trial fail at run time
    path = write_sweep(tmp_path, "tiny", {"data.on_corrupt": {"grid": ["skip", "fail"]}}, tmp_path / "ray")
    root = make_image_folder(tmp_path / "images")
    spec, base, (cfg, *_) = load_sweep(
        path, overrides=["data.dataset=imagefolder", f"data.root={root}", "data.limit_train=null"]
    )
    parent_id, failed, unfinished = run_sweep(spec, base, cfg)
    assert (failed, unfinished) == (1, 0)
    runs = {r.info.run_name: r for r in children(mlflow_uri, "tiny")}
    assert sorted(runs) == ["tiny-00000", "tiny-00001"]
    ok, bad = runs["tiny-00000"], runs["tiny-00001"]
    assert ok.info.status == "FINISHED" and bad.info.status == "FAILED"
    assert ok.data.tags[tracking.SWEEP_TAG] == "tiny" and ok.data.tags[tracking.PARENT_RUN_TAG] == parent_id
    assert ok.data.params["model.bn"] == "split" and "knn_top1" in ok.data.metrics
    assert MlflowClient(tracking_uri=mlflow_uri).get_run(parent_id).info.status == "FINISHED"


def _mocolab(log: Path, *args: str, **kwargs) -> subprocess.Popen:
    """``mocolab ARGS`` in its own session (so that it can be killed with the Ray it starts), output to ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "mocolab.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kwargs,
        )


def test_killed_sweep_resumes_with_exactly_one_run_per_trial(mlflow_uri, tmp_path):
    path = write_sweep(tmp_path, "killed", {"moco.momentum": {"grid": [0.0, 0.9, 0.99]}}, tmp_path / "ray")
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    env.pop("RAY_ADDRESS", None)
    first = _mocolab(tmp_path / "first.log", "sweep", str(path), env=env, cwd=tmp_path)
    deadline = time.time() + 420
    try:
        while time.time() < deadline and first.poll() is None:
            time.sleep(3)
            try:
                statuses = [r.info.status for r in children(mlflow_uri, "killed")]
            except Exception:  # the parent run is not created yet
                continue
            if "FINISHED" in statuses:
                break
        assert first.poll() is None, f"the sweep ended before it was killed: {(tmp_path / 'first.log').read_text()}"
        assert statuses.count("FINISHED") < 3
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started
        first.wait()
    second = _mocolab(tmp_path / "second.log", "sweep", str(path), "--resume", env=env, cwd=tmp_path)
    try:
        assert second.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
            second.wait()
    runs = children(mlflow_uri, "killed")
    assert sorted(r.info.run_name for r in runs) == ["killed-00000", "killed-00001", "killed-00002"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert sorted(float(r.data.params["moco.momentum"]) for r in runs) == [0.0, 0.9, 0.99]
    assert find_sweep_parent(mlflow_uri, "killed")["status"] == "FINISHED"
