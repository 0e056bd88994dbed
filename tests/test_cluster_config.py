"""ray_cluster.yaml passes Ray's own cluster-config validation and keeps the secure defaults (no cloud calls)."""

from __future__ import annotations

import copy
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
        name: spec
        for name, spec in config["available_node_types"].items()
        if name != config["head_node_type"]
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


def test_mlflow_server_on_the_head_with_a_database_and_s3_artifacts(raw_config):
    head = "\n".join(_validated(raw_config)["head_start_ray_commands"])
    assert "mlflow server" in head
    assert "--backend-store-uri sqlite:///" in head
    assert "--artifacts-destination s3://" in head
    assert "--host $(cat ~/mlflow/host_ip)" in head  # the head's private address, never 0.0.0.0
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in "\n".join(raw_config["worker_start_ray_commands"])
