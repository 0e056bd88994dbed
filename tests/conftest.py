"""Shared test fixtures: one local Ray instance per session and a throw-away MLflow store per test."""

from __future__ import annotations

import os

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
