"""``mocolab sweep`` on a tiny sweep prints one line per trial start and end with its setting and kNN accuracy, and
none of Ray Tune's own console (its boxed tables of every trial's config and results, the TensorBoard hint)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from tiny_sweep import write_sweep

pytestmark = pytest.mark.slow  # a local Ray and two one-epoch trials: ~55 s on 2 busy cores


def test_a_quiet_sweep_prints_one_start_and_one_end_line_per_trial(mlflow_uri, tmp_path):
    write_sweep(tmp_path, "quiet", {"moco.momentum": {"grid": [0.0, 0.9]}}, tmp_path / "ray", seeds=[3])
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "mocolab.cli", "sweep", "quiet.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for tune_console in ("TensorBoard", "╭", "│", "+----", "Trial status", "View detailed results"):
        assert tune_console not in out, out
    for number, momentum in (("00000", "0.0"), ("00001", "0.9")):
        trial = re.escape(f"[mocolab] trial quiet-{number} (moco.momentum={momentum} seed=3)")
        assert len(re.findall(rf"^{trial} started$", out, re.M)) == 1, out
        assert len(re.findall(rf"^{trial} done: knn_top1 \d+\.\d\d$", out, re.M)) == 1, out
    assert "sweep 'quiet' done" in out
