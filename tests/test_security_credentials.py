"""No credentials leave the machine through a run: a small real pretraining with secrets in the environment
and a password in the tracking URI, then a scan of everything it recorded for the secrets' values.

Scanned: the MLflow run's params, tags, name and artifacts (config.yaml, ...), the console output
(what `ray job logs` keeps) and the Ray storage folder (checkpoints, which may sit in shared storage).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import pytest
from local_servers import mlflow_server
from mlflow import MlflowClient

from mocolab import cli

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "experiments" / "pretrain" / "quickstart.yaml")
SECRET_NAME = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD)$")
FAKE_SECRETS = {
    "MYSERVICE_API_KEY": "fake-myservice-key-5f2c",
    "AWS_SECRET_ACCESS_KEY": "fake/aws+secret-3c7e91",
    "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-pw-81d0",
}


def secret_values() -> set[str]:
    """Values of environment variables named *KEY, *SECRET, *TOKEN, *PASSWORD (long enough to mean something)."""
    return {v for k, v in os.environ.items() if SECRET_NAME.search(k.upper()) and len(v) >= 8}


def leaks(texts: dict[str, str], secrets: set[str]) -> list[str]:
    return [f"{secret!r} in {where}" for where, text in texts.items() for secret in secrets if secret in text]


def test_no_secret_in_params_tags_artifacts_logs_or_checkpoints(ray_local, tmp_path, monkeypatch, capfd):
    for name, value in FAKE_SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    storage = tmp_path / "ray_results"
    with (
        tempfile.TemporaryDirectory(prefix="mlflow-", dir=tmp_path) as server_dir,
        mlflow_server(Path(server_dir)) as uri,
    ):
        uri_with_password = uri.replace("http://", f"http://alice:{FAKE_SECRETS['MLFLOW_TRACKING_PASSWORD']}@")
        code = cli.main(
            ["pretrain", QUICKSTART, "--set", f"tracking.tracking_uri={uri_with_password}",
             "--set", "tracking.experiment=credentials", "--set", "tracking.run_name=credentials-scan",
             "--set", f"scaling.storage_path={storage}", "--set", "train.epochs=1", "--set", "train.batch_size=32",
             "--set", "moco.queue_size=256", "--set", "data.limit_train=128", "--set", "data.limit_test=64",
             "--set", "train.knn_every=0"]
        )  # fmt: skip
        output = "".join(capfd.readouterr())
        assert code == 0, output[-4000:]

        client = MlflowClient(tracking_uri=uri)
        (run,) = client.search_runs([client.get_experiment_by_name("credentials").experiment_id])
        recorded = {
            "params": "\n".join(f"{k}={v}" for k, v in run.data.params.items()),
            "tags": "\n".join(f"{k}={v}" for k, v in run.data.tags.items()),
            "run name": run.info.run_name,
            "console output": output,
        }
        artifacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts")))
        for path in artifacts.rglob("*"):
            if path.is_file():
                recorded[f"artifact {path.relative_to(artifacts)}"] = path.read_bytes().decode("latin-1")
    for path in storage.rglob("*"):
        if path.is_file():
            recorded[f"storage {path.relative_to(storage)}"] = path.read_bytes().decode("latin-1")

    assert "artifact config.yaml" in recorded and any(k.startswith("storage ") for k in recorded)
    secrets = secret_values()
    assert set(FAKE_SECRETS.values()) <= secrets
    found = leaks(recorded, secrets)
    assert not found, "credentials recorded: " + "; ".join(found)
