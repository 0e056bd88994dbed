"""Shared test fixtures: one local Ray instance per session, a throw-away MLflow store per test, and the cluster's
services (PostgreSQL, an S3-compatible store, an MLflow server on both), each started once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The helpers (tests/support/) import as top-level modules, here, in forked ranks and in Ray workers (which get the
# driver's sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """A fresh local Ray instance with 2 CPUs, shared by every test of the session."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server for the session (~1 s to start): ``postgresql://mlflow:PASSWORD@127.0.0.1:PORT/mlflow``."""
    from local_servers import postgres_server

    with postgres_server() as uri:
        yield uri


@pytest.fixture(scope="session")
def s3():
    """moto's S3-compatible server for the session (~1.5 s to start), with one bucket: a ``local_servers.S3Store``
    (``endpoint``, ``bucket``, ``env``: the AWS environment that reaches it, ``keys(prefix)``)."""
    from local_servers import s3_server

    with s3_server() as store:
        yield store


@pytest.fixture(scope="session")
def mlflow_on_postgres(postgres, s3, tmp_path_factory):
    """An MLflow server for the session on the ``postgres`` database, proxying artifacts to
    ``s3://BUCKET/mocolab/mlflow-artifacts`` (the cluster's layout; ~10 s to start): a ``local_servers.MlflowServer``
    (``uri``, ``restart()``, ``backend_store_uri``, ``artifacts_destination``)."""
    from local_servers import MlflowServer, clean_env

    server = MlflowServer(
        tmp_path_factory.mktemp("mlflow-on-postgres"),
        clean_env(**s3.env),
        backend_store_uri=postgres,
        artifacts_destination=f"s3://{s3.bucket}/mocolab/mlflow-artifacts",
    )
    with server:
        yield server


@pytest.fixture(scope="session")
def job_cluster(s3, mlflow_on_postgres):
    """What ray_cluster.yaml builds on AWS, on this machine: a Ray head with no CPU for training (job server on
    127.0.0.1, token auth) and two worker nodes of one CPU and one ``JOB_SLOT`` each, every node exporting the AWS
    variables of ``s3`` and ``MLFLOW_TRACKING_URI`` (``mlflow_on_postgres``) before ``ray start``. A
    ``local_cluster.LocalCluster`` (``dashboard_url``, ``env``, ``nodes``, ``add_node``, ``kill_node``)."""
    from local_cluster import JOB_SLOT, local_cluster
    from local_servers import wait_for_http

    node_env = {**s3.env, "MLFLOW_TRACKING_URI": mlflow_on_postgres.uri}
    with local_cluster(node_env=node_env, dashboard=True) as cluster:
        cluster.add_node(num_cpus=0, resources={})  # the head: job drivers, Ray Train's controller; no training
        for _ in range(2):
            cluster.add_node(num_cpus=1, resources={JOB_SLOT: 1})
        token = {"Authorization": f"Bearer {cluster.token.read_text()}"}
        wait_for_http(f"{cluster.dashboard_url}/api/version", 120, token)
        yield cluster


@pytest.fixture
def command_output(capsys):
    """``capsys.readouterr`` for a command run in-process, without the lines streamed from Ray workers: the session's
    Ray (``log_to_driver``) may still be flushing an earlier test's worker output (a traceback, say) into this
    process, and a command that starts no Ray prints none of its own."""
    from console_output import without_ray_worker_lines

    def read():
        captured = capsys.readouterr()
        return type(captured)(without_ray_worker_lines(captured.out), without_ray_worker_lines(captured.err))

    return read


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    """A sqlite MLflow store under the test's tmp dir, set as ``MLFLOW_TRACKING_URI``.

    The test also runs in ``tmp_path`` so that MLflow's default artifact root (``./mlruns``) and
    relative paths stay out of the repository."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the test: tiny tensors run faster so, and far faster on a loaded machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
