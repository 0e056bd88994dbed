"""`ray job submit` end to end: a real Ray head and a real MLflow server on 127.0.0.1, a pretraining job
and a sweep job submitted over the job server, their runs found in MLflow over HTTP.

Isolation from the rest of the suite (and from other Ray users on the machine): the head runs as
``ray start --head --block`` in its own process session, with its own ``--temp-dir``, free ports and
token, so it never touches the in-process ``ray_local`` instance (which may be alive, idle, in the
same pytest session) and the order of tests does not matter. It is stopped by SIGTERM to that process
(Ray drains and stops the node it started), then SIGKILL to whatever is left in its session; never
with ``ray stop``, which kills every Ray process on the machine.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from console_output import chatter, progress_lines
from local_servers import VENV_BIN, clean_env, free_port, mlflow_server, start_in_session, stop_session, wait_for_http
from mlflow import MlflowClient

from mocolab.config import parse_override

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = "experiments/pretrain/quickstart.yaml"
# Small enough for 2 shared CPUs; a real 2-worker run with shuffle-BN over gloo.
TINY = [
    "tracking.system_metrics_interval_s=1",
    "train.epochs=1",
    "train.batch_size=32",
    "moco.queue_size=256",
    "data.limit_train=128",
    "data.limit_test=64",
    "data.loader_workers=0",
    "train.knn_every=1",
]
RUNTIME_ENV_EXCLUDES = [".git", ".venv", "*.db", "mlruns", "ray_results", "reports", "__pycache__"]
HEAD_PORTS = (
    "port",
    "dashboard-port",
    "ray-client-server-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
    "node-manager-port",
    "object-manager-port",
)


@pytest.fixture(scope="module")
def cluster():
    """A Ray head (token auth on, dashboard on 127.0.0.1) and an MLflow server on 127.0.0.1."""
    # A short path: Ray's unix sockets live under --temp-dir and must stay under ~107 characters.
    tmp = Path(tempfile.mkdtemp(prefix="mocolab-jobs-", dir="/tmp"))
    token_file = tmp / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    ports = {name: free_port() for name in HEAD_PORTS}
    head = start_in_session(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", "--dashboard-host=127.0.0.1",
         "--disable-usage-stats", f"--temp-dir={tmp / 'ray'}"] + [f"--{name}={port}" for name, port in ports.items()],
        cwd=tmp, env=env, log=tmp / "head.log",
    )  # fmt: skip
    try:
        with mlflow_server(tmp, env) as mlflow_uri:
            dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
            auth = {"Authorization": f"Bearer {token_file.read_text()}"}
            wait_for_http(f"{dashboard}/api/version", 120, auth)
            yield {"dashboard": dashboard, "mlflow_uri": mlflow_uri, "env": env, "tmp": tmp, "auth": auth}
    finally:
        stop_session(head, 60)
        for log in ("head.log", "mlflow.log"):
            if (tmp / log).is_file():
                print(f"--- {log} (tail) ---\n{(tmp / log).read_text(errors='replace')[-3000:]}")
        shutil.rmtree(tmp, ignore_errors=True)


def submit(cluster: dict, entrypoint: list[str], timeout_s: float) -> str:
    """``ray job submit`` the way the README shows it; wait for the job, return its logs; fail with them."""
    runtime_env = {
        "env_vars": {"MLFLOW_TRACKING_URI": cluster["mlflow_uri"]},
        "py_modules": ["platform/mocolab"],  # the checkout's code, not whatever is installed on the nodes
        "excludes": RUNTIME_ENV_EXCLUDES,
    }
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", cluster["dashboard"], "--working-dir", ".",
           "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, env=cluster["env"], capture_output=True, text=True, timeout=timeout_s)
    logs = out.stdout + out.stderr
    assert out.returncode == 0, f"job {' '.join(entrypoint)} failed (exit {out.returncode}):\n{logs[-6000:]}"
    assert "succeeded" in logs
    return logs


def test_job_server_refuses_requests_without_the_token(cluster):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{cluster['dashboard']}/api/jobs/", timeout=10)
    assert err.value.code in (401, 403)
    with urllib.request.urlopen(
        urllib.request.Request(f"{cluster['dashboard']}/api/jobs/", headers=cluster["auth"]), timeout=10
    ) as resp:
        assert resp.status == 200


def test_job_runs_the_uploaded_checkout_not_the_installed_copy(cluster):
    logs = submit(cluster, ["python", "-c", "import mocolab; print('MOCOLAB_AT', mocolab.__file__)"], timeout_s=300)
    (line,) = [line for line in logs.splitlines() if line.startswith("MOCOLAB_AT")]
    location = Path(line.split(maxsplit=1)[1])
    assert not location.is_relative_to(REPO)  # py_modules: Ray's copy of platform/mocolab
    assert location.parent.name == "mocolab" and "runtime_resources" in location.parts


def test_pretrain_job_logs_to_the_mlflow_server(cluster):
    storage = cluster["tmp"] / "ray_results"
    run_name = f"job-pretrain-{secrets.token_hex(2)}"
    logs = submit(
        cluster,
        ["mocolab", "pretrain", QUICKSTART, "--set", f"tracking.run_name={run_name}",
         "--set", "tracking.experiment=cluster-jobs", "--set", f"scaling.storage_path={storage}",
         *[arg for item in TINY for arg in ("--set", item)]],
        timeout_s=540,
    )  # fmt: skip
    client = MlflowClient(tracking_uri=cluster["mlflow_uri"])  # over HTTP, as a laptop would
    experiment = client.get_experiment_by_name("cluster-jobs")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["mocolab.stage"] == "pretrain"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "backbone.pt"}
    assert any(storage.glob(f"{run_name}/checkpoint_*/checkpoint.pt")), "no checkpoint under scaling.storage_path"
    # what MLflow's UI shows of it (over HTTP, artifacts through the server)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "digits/train" and dataset_input.dataset.source_type == "code"
    (output,) = run.outputs.model_outputs
    assert client.get_logged_model(output.model_id).name == "backbone"
    assert run.data.tags["mlflow.source.name"] == "mocolab pretrain"
    assert f"[mocolab] MLflow UI: {cluster['mlflow_uri']}/#/experiments/" in logs
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # its console, as `ray job submit` streams it: mocolab's lines once, none of Ray's internals
    assert chatter(logs) == []
    lines = progress_lines(logs)
    assert len(lines) == len(set(lines)), lines
    assert sum(line.startswith("[mocolab] epoch    1/1") for line in lines) == 1


def test_sweep_job_logs_a_parent_and_its_trials(cluster):
    name = f"job-sweep-{secrets.token_hex(2)}"
    base = {"config": str(REPO / QUICKSTART), "tracking.experiment": "cluster-jobs",
            "scaling.storage_path": str(cluster["tmp"] / "ray_results")}  # fmt: skip
    base.update(parse_override(item) for item in TINY)
    sweep_file = cluster["tmp"] / f"{name}.yaml"
    sweep_file.write_text(
        json.dumps(  # JSON is YAML
            {"name": name, "base": base, "space": {"moco.temperature": {"grid": [0.1, 0.2]}},
             "resources": {"workers": 1, "cpus_per_worker": 1}, "max_concurrent_trials": 2}  # fmt: skip
        )
    )
    submit(cluster, ["mocolab", "sweep", str(sweep_file)], timeout_s=540)
    client = MlflowClient(tracking_uri=cluster["mlflow_uri"])
    experiment = client.get_experiment_by_name("cluster-jobs")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`mocolab.sweep` = '{name}'")
    parents = [r for r in runs if r.data.tags.get("mocolab.stage") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("mocolab.stage") == "pretrain"]
    assert len(parents) == 1
    assert len(trials) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parents[0].info.run_id}
    assert {r.data.params["moco.temperature"] for r in trials} == {"0.1", "0.2"}
    assert all(r.info.status == "FINISHED" for r in trials)
