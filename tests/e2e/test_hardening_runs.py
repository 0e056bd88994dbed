"""Issue 11 cases that need real processes, Ray or an MLflow server (slow):

4. a driver killed with SIGKILL leaves its run RUNNING: the next start of that name says it found a stale run and
   resumes it; Ctrl-C (SIGINT to the command's process group, as a terminal sends it) during `mocolab pretrain`
   leaves the run KILLED and prints the exact command that resumes it, which then finishes the run;
2. on a cluster (`RAY_ADDRESS`) workers the cluster cannot give are awaited at most `scaling.start_timeout_s`, then
   the run fails naming what is pending (the MLflow run FAILED, not RUNNING);
1. `mocolab report nosuch` / `--experiment nosuchexp` against a reachable server with a password in the URI name
   the URI masked.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from local_servers import clean_env, mlflow_server, start_in_session
from mlflow import MlflowClient

from mocolab.config import build_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = str(REPO / "experiments" / "pretrain" / "quickstart.yaml")
SMALL = ["--set", "train.epochs=8", "--set", "data.limit_train=256", "--set", "data.limit_test=64",
         "--set", "train.knn_every=0", "--set", "train.checkpoint_every=1", "--set", "moco.queue_size=256"]  # fmt: skip
EPOCH_LINE = re.compile(r"\[mocolab\] epoch +(\d+)/")


def wait_for(log: Path, pattern: str, proc: subprocess.Popen, timeout_s: float = 600, after: int = 0) -> re.Match:
    """The first match of ``pattern`` in ``log`` beyond character ``after``; fails if the process ends first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text(errors="replace")[after:])
        if found:
            return found
        assert proc.poll() is None, f"ended ({proc.returncode}) before {pattern!r}:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)
    raise TimeoutError(f"{pattern!r} not in {log} within {timeout_s} s:\n{log.read_text()[-4000:]}")


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL everything left in the process session a test started (the driver and the local Ray it started)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


def test_case_4_sigkill_then_stale_resume_then_ctrl_c_then_the_printed_command_finishes(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = clean_env(PYTHONPATH=str(REPO / "platform"), MLFLOW_TRACKING_URI=uri)
    mocolab = [sys.executable, "-m", "mocolab.cli"]
    argv = ["pretrain", QUICKSTART, *SMALL, "--set", f"scaling.storage_path={tmp_path / 'ray_results'}"]
    started: list[subprocess.Popen] = []

    def start(args: list[str], log: Path) -> subprocess.Popen:
        started.append(start_in_session([*mocolab, *args], tmp_path, env, log))
        return started[-1]

    try:
        # A: the driver dies with SIGKILL in its first epochs
        first = start(argv, tmp_path / "a.log")
        name = wait_for(tmp_path / "a.log", r"starting run '([^']+)'", first).group(1)
        wait_for(tmp_path / "a.log", EPOCH_LINE.pattern, first)
        kill_session(first)
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
        assert (run.info.run_name, run.info.status) == (name, "RUNNING")

        # B: the same name again: a stale run, resumed; then Ctrl-C
        second = start([*argv, "--set", f"tracking.run_name={name}"], tmp_path / "b.log")
        wait_for(tmp_path / "b.log", f"found a stale run '{name}' .* left RUNNING by a driver that is gone "
                 rf"\(process {first.pid} on [^)]+\); resuming it", second)  # fmt: skip
        resumed_at = wait_for(tmp_path / "b.log", r"resumed from epoch", second).end()
        wait_for(tmp_path / "b.log", EPOCH_LINE.pattern, second, after=resumed_at)
        interrupted = time.monotonic()
        os.killpg(second.pid, signal.SIGINT)
        assert second.wait(120) == 130
        stop_s = time.monotonic() - interrupted
        assert stop_s < 60, f"Ctrl-C took {stop_s:.0f} s"
        output = (tmp_path / "b.log").read_text()
        assert client.get_run(run.info.run_id).info.status == "KILLED"
        line = next(line for line in output.splitlines() if line.startswith("mocolab pretrain: "))
        assert f"run '{name}' interrupted; MLflow run {run.info.run_id} marked KILLED; resume it with: " in line
        resume = line.split("resume it with: ", 1)[1]
        assert shlex.split(resume) == ["mocolab", *argv, "--set", f"tracking.run_name={name}"]
        kill_session(second)

        # C: the printed command resumes the run and finishes it
        third = start(shlex.split(resume)[1:], tmp_path / "c.log")
        assert third.wait(900) == 0, (tmp_path / "c.log").read_text()[-4000:]
        output = (tmp_path / "c.log").read_text()
        assert f"resuming run '{name}'" in output and "found a stale run" not in output
        assert client.get_run(run.info.run_id).info.status == "FINISHED"
        print(f"Ctrl-C to exit: {stop_s:.1f} s")
    finally:
        for proc in started:
            kill_session(proc)


def test_case_2_a_cluster_that_cannot_give_the_workers_fails_after_start_timeout(
    ray_local, mlflow_uri, monkeypatch, tmp_path
):
    from mocolab.orchestrate import pretrain_and_evaluate
    from mocolab.runtime import WorkersNotStartedError

    if not ray_local.is_initialized():  # an earlier command in this session shut the shared instance down
        ray_local.init(address="local", num_cpus=2, include_dashboard=False)
    # a cluster: only the bounded wait applies; the address is the running instance's, which the command joins
    monkeypatch.setenv("RAY_ADDRESS", ray_local.get_runtime_context().gcs_address)
    cfg = build_config({
        "model": {"arch": "small_cnn"}, "moco": {"queue_size": 384},
        "train": {"epochs": 1, "batch_size": 32}, "data": {"limit_train": 256, "limit_test": 64},
        "scaling": {"num_workers": 3, "start_timeout_s": 5, "storage_path": str(tmp_path / "ray_results")},
        "tracking": {"experiment": "capacity", "run_name": "too-wide"},
    })  # fmt: skip
    started = time.monotonic()
    with pytest.raises(WorkersNotStartedError) as err:
        pretrain_and_evaluate(cfg)
    waited = time.monotonic() - started
    message = str(err.value)
    assert "Ray could not start 3 worker(s) of 1 CPU each (scaling.num_workers" in message
    assert "within scaling.start_timeout_s=5 s; the cluster has 2 CPU" in message
    assert waited < 120, f"waited {waited:.0f} s"
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("capacity").experiment_id])
    assert run.info.status == "FAILED"


def test_case_1_report_names_a_reachable_server_masked(tmp_path):
    with mlflow_server(tmp_path) as uri:
        secret_uri = uri.replace("http://", "http://user:s3cret-77ab@")
        env = clean_env(PYTHONPATH=str(REPO / "platform"), MLFLOW_TRACKING_URI=secret_uri)
        for args, expected in (
            (["nosuch"], "no sweep named 'nosuch' in http://***@127.0.0.1:"),
            (["--experiment", "nosuchexp"], "no experiment named 'nosuchexp' in http://***@127.0.0.1:"),
        ):
            out = subprocess.run([sys.executable, "-m", "mocolab.cli", "report", *args], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=600)  # fmt: skip
            assert out.returncode == 2, out.stderr[-3000:]
            assert expected in out.stderr
            assert "s3cret-77ab" not in out.stdout + out.stderr and "Traceback" not in out.stderr
