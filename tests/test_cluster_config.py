"""ray_cluster.yaml passes Ray's own cluster-config validation and keeps the secure defaults (no cloud calls)."""

from __future__ import annotations

import copy
import re
import subprocess
import time
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "ray_cluster.yaml"


@pytest.fixture(scope="module")
def raw_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _validated(raw: dict) -> dict:
    """What `ray up` does before it calls the cloud: fill AWS defaults, merge commands, check the schema."""
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def test_cluster_yaml_passes_ray_schema_validation(raw_config):
    config = _validated(raw_config)
    assert config["provider"]["type"] == "aws"
    head = config["available_node_types"][config["head_node_type"]]
    assert head["max_workers"] == 0 and head["resources"] == {"CPU": 0}
    gpu_types = {
        name: spec for name, spec in config["available_node_types"].items() if name != config["head_node_type"]
    }
    assert gpu_types, "no worker node types"
    for spec in gpu_types.values():
        assert spec["node_config"]["InstanceType"].startswith(("p4d.", "p5."))
        assert 0 <= spec["min_workers"] <= spec["max_workers"] <= config["max_workers"]


def test_schema_validation_rejects_a_misspelled_key(raw_config):
    broken = copy.deepcopy(raw_config)
    broken["head_start_ray_comands"] = broken.pop("head_start_ray_commands")
    with pytest.raises(jsonschema.ValidationError, match="head_start_ray_comands"):
        _validated(broken)


def test_every_node_installs_the_pinned_requirements_and_the_project(raw_config):
    config = _validated(raw_config)
    assert config["file_mounts"]["~/mocolab"] == "."
    for commands in (config["head_setup_commands"], config["worker_setup_commands"]):
        joined = "\n".join(commands)
        assert "pip install -q -r ~/mocolab/requirements.txt" in joined
        assert "-e ~/mocolab" in joined
    assert ".venv" in config["rsync_exclude"]


def test_token_auth_stays_on_and_nothing_binds_a_public_address(raw_config):
    config = _validated(raw_config)
    head = "\n".join(config["head_start_ray_commands"])
    workers = "\n".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in workers
    assert "RAY_AUTH_MODE=disabled" not in head + workers
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in head + workers


def _mlflow_command(raw: dict) -> str:
    (command,) = [c for c in _validated(raw)["head_start_ray_commands"] if "mlflow server" in c]
    return command


def test_mlflow_server_on_the_head_keeps_runs_in_postgresql_and_artifacts_in_the_bucket(raw_config):
    command = _mlflow_command(raw_config)
    assert "--artifacts-destination s3://BUCKET/mocolab/mlflow-artifacts" in command
    assert "--host $(cat ~/mlflow/host_ip)" in command  # the head's private address, never 0.0.0.0
    assert "sqlite" not in command and "--backend-store-uri" not in command  # the store comes from the environment
    assert raw_config["file_mounts"]["~/.mocolab/mlflow_backend_store_uri"] == "~/.mocolab/mlflow_backend_store_uri"
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in "\n".join(raw_config["worker_start_ray_commands"])
    assert set(re.findall(r"://([^\s/@]+)@", CLUSTER_YAML.read_text())) == {"USER:PASSWORD"}  # no credentials


def _run_head_mlflow_command(raw: dict, home: Path, store_uri: str | None) -> subprocess.CompletedProcess:
    """The head's MLflow start command in bash, with ``mlflow`` a stand-in that records its arguments and store."""
    (home / "mlflow").mkdir()
    (home / "mlflow" / "host_ip").write_text("10.0.0.5\n")
    bin_dir = home / "bin"
    bin_dir.mkdir()
    (bin_dir / "mlflow").write_text(
        '#!/bin/sh\nprintf "%s\\n" "$@" > "$HOME/argv.tmp"; echo "$MLFLOW_BACKEND_STORE_URI" > "$HOME/store";'
        ' mv "$HOME/argv.tmp" "$HOME/argv"\n'
    )
    (bin_dir / "mlflow").chmod(0o755)
    env = {"HOME": str(home), "PATH": f"{bin_dir}:/usr/bin:/bin"}
    if store_uri is not None:
        (home / ".mocolab").mkdir()
        (home / ".mocolab" / "mlflow_backend_store_uri").write_text(store_uri + "\n")
    done = subprocess.run(["bash", "-c", _mlflow_command(raw)], env=env, capture_output=True, text=True, timeout=30)
    deadline = time.monotonic() + 10
    while done.returncode == 0 and not (home / "argv").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # the command starts mlflow in the background
    return done


def test_head_starts_mlflow_on_the_postgresql_uri_without_putting_it_on_a_command_line(raw_config, tmp_path):
    uri = "postgresql://mlflow:pa55-word@db.example:5432/mlflow"
    done = _run_head_mlflow_command(raw_config, tmp_path, uri)
    assert done.returncode == 0, done.stderr
    argv = (tmp_path / "argv").read_text().split("\n")
    assert argv[:3] == ["server", "--artifacts-destination", "s3://BUCKET/mocolab/mlflow-artifacts"]
    assert "10.0.0.5" in argv and "pa55-word" not in "\n".join(argv)
    assert (tmp_path / "store").read_text().strip() == uri  # mlflow's --backend-store-uri, read from its envvar


@pytest.mark.parametrize("store_uri", [None, "sqlite:////home/ray/mlflow/mlflow.db"], ids=["missing", "sqlite"])
def test_head_refuses_to_start_mlflow_without_a_postgresql_store(raw_config, tmp_path, store_uri):
    done = _run_head_mlflow_command(raw_config, tmp_path, store_uri)
    assert done.returncode == 1
    assert "mocolab: no PostgreSQL store for MLflow: put postgresql://USER:PASSWORD@HOST:5432/DB in" in done.stderr
    assert not (tmp_path / "argv").exists()
