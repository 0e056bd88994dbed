"""mocolab's Ray jobs run their workers at normal priority (``runtime.ray_job_env``), not at Ray's default nice 15."""

from __future__ import annotations

import os

from mocolab.runtime import ray_job_env


def test_job_env_runs_workers_at_normal_priority(ray_local, monkeypatch):
    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)

    def niceness() -> int:  # local: pickled by value, so workers need not import this module
        return os.nice(0)

    task = ray_local.remote(niceness)
    at_15 = task.options(runtime_env={"env_vars": {"RAY_worker_niceness": "15"}})
    assert ray_local.get(at_15.remote()) == 15  # the setting reaches the worker, so the next check can fail
    ours = task.options(runtime_env={"env_vars": ray_job_env(None)})
    assert ray_local.get(ours.remote()) == 0
