"""Hardening without Ray: stale-run detection, the resume command, the capacity rule, link loops, masked errors,
fail-fast tracking stores, trial runs closed after a sweep, and the numbered cases of issue 11 that need no Ray:

1. `mocolab report` against an unreachable server with a password in the URI fails fast and masks it;
2. more workers than a local Ray can hold are refused before Ray starts or an MLflow run exists;
6. an ImageFolder whose splits hold no class folders is refused by a real `mocolab pretrain` process: exit 2,
   one line, no traceback, no MLflow store touched.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from local_servers import clean_env
from mlflow import MlflowClient

from mocolab import cli, tracking
from mocolab.config import ConfigError, build_config
from mocolab.preflight.cluster import capacity_shortfall, stage_workers
from mocolab.preflight.data import repeated_folder

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = str(REPO / "experiments" / "pretrain" / "quickstart.yaml")
HOST = socket.gethostname()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- stale runs ----------------------------------------------------------------------------------------------


def test_driver_state_tells_a_live_driver_from_a_gone_one():
    starts = {100: "555", 200: "777"}.get  # pid -> start time of the processes that exist
    state = lambda tag: tracking.driver_state(tag, HOST, own_pid=200, process_start=starts)  # noqa: E731
    assert state(f"{HOST}:100:555") == tracking.DRIVER_ALIVE
    assert state(f"{HOST}:100:554") == tracking.DRIVER_GONE  # pid reused by another process
    assert state(f"{HOST}:300:555") == tracking.DRIVER_GONE  # no such process
    assert state(f"{HOST}:200:777") == tracking.DRIVER_SELF
    assert state("other-host:100:555") == tracking.DRIVER_UNKNOWN
    assert state(None) == tracking.DRIVER_UNKNOWN
    assert state(f"{HOST}:100:?") == tracking.DRIVER_UNKNOWN  # recorded where /proc was missing


def test_this_process_is_its_own_driver():
    tag = tracking.driver_id()
    assert tag.startswith(f"{HOST}:{os.getpid()}:")
    assert tracking.driver_state(tag, HOST, os.getpid(), tracking.process_start) == tracking.DRIVER_SELF
    parent = os.getppid()
    parent_tag = f"{HOST}:{parent}:{tracking.process_start(parent)}"
    assert tracking.driver_state(parent_tag, HOST, os.getpid(), tracking.process_start) == tracking.DRIVER_ALIVE


@pytest.fixture
def cfg(mlflow_uri):
    return build_config({"tracking": {"experiment": "stale", "run_name": "run-s"}})


def _running_with_driver(cfg, mlflow_uri, driver: str) -> str:
    run_id, _ = tracking.start_pretrain_run(cfg)
    MlflowClient(mlflow_uri).set_tag(run_id, tracking.DRIVER_TAG, driver)
    return run_id


def test_a_run_left_running_by_a_dead_driver_resumes_with_a_notice(cfg, mlflow_uri, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_id = _running_with_driver(cfg, mlflow_uri, f"{HOST}:{dead.pid}:1")
    assert tracking.start_pretrain_run(cfg) == (run_id, True)
    out = capsys.readouterr().out
    assert f"found a stale run 'run-s' (MLflow run {run_id}) left RUNNING by a driver that is gone" in out
    assert f"process {dead.pid} on {HOST}" in out
    assert MlflowClient(mlflow_uri).get_run(run_id).data.tags[tracking.DRIVER_TAG] == tracking.driver_id()


def test_a_run_a_live_driver_runs_is_refused(cfg, mlflow_uri):
    parent = os.getppid()
    run_id = _running_with_driver(cfg, mlflow_uri, f"{HOST}:{parent}:{tracking.process_start(parent)}")
    with pytest.raises(ConfigError, match=f"is RUNNING in process {parent} on {HOST}; wait for it"):
        tracking.start_pretrain_run(cfg)
    assert MlflowClient(mlflow_uri).get_run(run_id).info.status == "RUNNING"


def test_a_run_of_another_host_resumes_with_a_warning(cfg, mlflow_uri, capsys):
    run_id = _running_with_driver(cfg, mlflow_uri, "gpu-node-7:4242:99")
    assert tracking.start_pretrain_run(cfg) == (run_id, True)
    assert "marked RUNNING by a driver on gpu-node-7 that cannot be checked from here" in capsys.readouterr().out


def test_a_run_this_process_left_running_resumes_silently(cfg, mlflow_uri, capsys):
    run_id, _ = tracking.start_pretrain_run(cfg)
    capsys.readouterr()
    assert tracking.start_pretrain_run(cfg) == (run_id, True)
    assert capsys.readouterr().out == ""


# --- Ctrl-C: the resume command ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["pretrain", "exp.yaml"], "mocolab pretrain exp.yaml --set tracking.run_name=moco-1"),
        (["pretrain", "my exp.yaml", "--set", "train.epochs=3"],
         "mocolab pretrain 'my exp.yaml' --set train.epochs=3 --set tracking.run_name=moco-1"),
        (["pretrain", "exp.yaml", "--set", "tracking.run_name=moco-1", "--set", "train.lr=0.1"],
         "mocolab pretrain exp.yaml --set train.lr=0.1 --set tracking.run_name=moco-1"),
        (["pretrain", "exp.yaml", "--set=tracking.run_name=moco-1"],
         "mocolab pretrain exp.yaml --set tracking.run_name=moco-1"),
        (["quickstart", "--seed", "2"], "mocolab quickstart --seed 2 --set tracking.run_name=moco-1"),
    ],
)  # fmt: skip
def test_the_resume_command_keeps_the_arguments_and_names_the_run(argv, expected):
    assert cli.resume_command(argv, "moco-1") == expected


class _Interrupted:
    @staticmethod
    def main(args):
        from mocolab.runtime import RunInterrupted

        raise RunInterrupted("run 'moco-1' interrupted; MLflow run abc marked KILLED", run_name="moco-1")


def test_an_interrupted_run_prints_its_resume_command_masked(capsys):
    argv = ["pretrain", "x.yaml", "--set", "tracking.tracking_uri=http://u:pw-9f1c@host"]
    assert cli._run("pretrain", _Interrupted, None, argv) == 130
    err = capsys.readouterr().err
    assert err == (
        "mocolab pretrain: run 'moco-1' interrupted; MLflow run abc marked KILLED; resume it with: mocolab pretrain "
        "x.yaml --set tracking.tracking_uri=http://***@host --set tracking.run_name=moco-1\n"
    )


class _Crashes:
    @staticmethod
    def main(args):
        raise RuntimeError("worker traceback ...\nOSError: cannot reach http://alice:pw-7e2a@mlflow.example/api")


def test_an_unexpected_error_is_one_masked_line_and_a_masked_log(command_output):
    assert cli._run("report", _Crashes, None, ["report"]) == 1
    err = command_output().err
    assert err.startswith("mocolab report: RuntimeError: OSError: cannot reach http://***@mlflow.example/api")
    assert "pw-7e2a" not in err and "Traceback" not in err and err.count("\n") == 1
    log = Path(err.rsplit("credentials masked: ", 1)[1].rstrip(")\n"))
    assert "Traceback" in log.read_text() and "pw-7e2a" not in log.read_text()
    log.unlink()


# --- workers against the machine -----------------------------------------------------------------------------


def test_capacity_rule():
    cpu = {"CPU": 1.0}
    assert capacity_shortfall({"scaling.num_workers": 2}, cpu, {"CPU": 2.0}) is None
    problem = capacity_shortfall({"scaling.num_workers": 8}, cpu, {"CPU": 2.0, "GPU": 0.0})
    assert problem.startswith("scaling.num_workers=8 workers x 1 CPU each (scaling.cpus_per_worker) need 8 CPU")
    assert "local Ray has 2 CPU, 0 GPU and would wait for them forever" in problem
    assert "lower scaling.num_workers (at most 2 here)" in problem
    gpu = capacity_shortfall({"scaling.num_workers": 2}, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0})
    assert "1 GPU each (scaling.use_gpu) need 2 GPU" in gpu
    wide = capacity_shortfall({"scaling.num_workers": 1}, cpu, {"CPU": 2.0}, concurrent=3)
    assert "max_concurrent_trials=3 trials at once" in wide and "lower max_concurrent_trials (at most 2 here)" in wide
    # the largest stage counts: a 2-worker linear evaluation after a 1-worker pretraining
    assert "eval.lincls.num_workers=3" in capacity_shortfall(
        {"scaling.num_workers": 1, "eval.lincls.num_workers": 3}, cpu, {"CPU": 2.0}
    )


def test_stage_workers_name_their_fields():
    cfg = build_config({"model": {"bn": "split"}, "scaling": {"num_workers": 1},
                        "eval": {"lincls": {"num_workers": 2}, "detection": {"num_workers": 3}}})  # fmt: skip
    assert stage_workers(cfg, ("pretrain", "lincls", "detection")) == {
        "scaling.num_workers": 1, "eval.lincls.num_workers": 2, "eval.detection.num_workers": 3,
    }  # fmt: skip


def test_case_2_more_workers_than_the_machine_is_refused_before_ray_or_mlflow(tmp_path, monkeypatch, capsys):
    """Issue 11 case 2: `--set scaling.num_workers=8` on a 2-CPU machine (this one's CPUs are made 2 here)."""
    import ray

    import mocolab.runtime

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(mocolab.runtime, "local_resources", lambda: {"CPU": 2.0, "GPU": 0.0})
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    started = time.monotonic()
    assert cli.main(["pretrain", QUICKSTART, "--set", "scaling.num_workers=8"]) == 2
    err = capsys.readouterr().err
    assert "scaling.num_workers=8 workers x 1 CPU each (scaling.cpus_per_worker) need 8 CPU" in err
    assert "the local Ray has 2 CPU, 0 GPU" in err
    assert time.monotonic() - started < 120  # refused in the driver: seconds on a quiet machine
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()


# --- data -------------------------------------------------------------------------------------------------------


def test_repeated_folders_are_found(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "dog").mkdir()
    assert repeated_folder(tmp_path / "train") is None
    (tmp_path / "train" / "dog" / "cats-too").symlink_to(tmp_path / "train" / "cat", target_is_directory=True)
    assert repeated_folder(tmp_path / "train") == (tmp_path / "train" / "dog" / "cats-too", tmp_path / "train" / "cat")
    (tmp_path / "train" / "dog" / "cats-too").unlink()
    (tmp_path / "train" / "cat" / "up").symlink_to("..", target_is_directory=True)
    assert repeated_folder(tmp_path / "train") == (tmp_path / "train" / "cat" / "up", tmp_path / "train")


def test_case_6_imagefolder_without_class_folders_is_refused_by_a_real_process(tmp_path):
    """Issue 11 case 6, through the installed CLI in its own process: one line, exit 2, no traceback, and no MLflow
    store or Ray storage touched (so no MLflow run exists)."""
    for split in ("train", "test"):
        (tmp_path / "images" / split).mkdir(parents=True)
    env = clean_env(PYTHONPATH=str(REPO / "platform"), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = subprocess.run(
        [sys.executable, "-m", "mocolab.cli", "pretrain", QUICKSTART, "--set", "data.dataset=imagefolder",
         "--set", f"data.root={tmp_path / 'images'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.startswith("mocolab pretrain: data.root=") and "Couldn't find any class folder" in out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stdout + out.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()


# --- tracking stores ----------------------------------------------------------------------------------------------


def test_case_1_report_against_an_unreachable_server_fails_fast_and_masked(tmp_path):
    """Issue 11 case 1: `MLFLOW_TRACKING_URI=http://user:secret@127.0.0.1:9 mocolab report nosuch` retried for
    ~250 s, then printed a traceback with the password."""
    uri = f"http://user:s3cret-5a1b@127.0.0.1:{closed_port()}"
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "mocolab.cli", "report", "nosuch"], cwd=tmp_path, capture_output=True, text=True,
        env=clean_env(PYTHONPATH=str(REPO / "platform"), MLFLOW_TRACKING_URI=uri), timeout=600,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-3000:]
    assert "MLflow tracking server http://***@127.0.0.1:" in out.stderr and "is unreachable" in out.stderr
    assert "s3cret-5a1b" not in out.stdout + out.stderr and "Traceback" not in out.stderr
    assert time.monotonic() - started < 120  # no MLflow retries: the import dominates


def test_tracking_stores_mlflow_cannot_use_are_refused(tmp_path, monkeypatch):
    (tmp_path / "text.db").write_text("not sqlite")
    with pytest.raises(ConfigError, match="is not a SQLite database"):
        tracking.check_reachable(f"sqlite:///{tmp_path / 'text.db'}")
    tracking.check_reachable(f"sqlite:///{tmp_path / 'new.db'}")  # a store still to be created is fine
    with pytest.raises(ConfigError, match="which MLflow 3 refuses; use sqlite:///"):
        tracking.check_reachable(str(tmp_path / "mlruns"))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    tracking.check_reachable(str(tmp_path / "mlruns"))


# --- sweeps ---------------------------------------------------------------------------------------------------------


def test_trial_runs_left_running_are_closed_after_a_sweep(mlflow_uri):
    from mocolab.tune.sweep import close_stopped_trials

    client = MlflowClient(mlflow_uri)
    experiment = tracking.experiment_id(client, "sw")
    parent = client.create_run(experiment, run_name="sw").info.run_id
    child = lambda name: client.create_run(experiment, run_name=name, tags={tracking.PARENT_RUN_TAG: parent})  # noqa: E731
    stopped, done, other = (
        child("sw-1").info.run_id,
        child("sw-2").info.run_id,
        client.create_run(experiment).info.run_id,
    )
    client.set_terminated(done, "FINISHED")
    assert close_stopped_trials(mlflow_uri, "sw", parent) == 1
    status = lambda run_id: client.get_run(run_id).info.status  # noqa: E731
    assert (status(stopped), status(done), status(other)) == ("KILLED", "FINISHED", "RUNNING")
