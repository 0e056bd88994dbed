"""A sweep trial whose training worker dies is retried by Ray Tune (the sweep's ``max_failures``) with the
same config: the retry resumes the trial's checkpoint, in the trial's one MLflow run, and the sweep
reports no failed trial. (A trial that keeps failing is reported FAILED: tests/tune/test_sweep_ray.py.)"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import yaml
from fault_injection import kill_a_worker_after_checkpoint
from mlflow import MlflowClient

from mocolab import tracking
from mocolab.tune.spec import load_sweep
from mocolab.tune.sweep import run_sweep

EPOCHS = 3


@pytest.mark.slow
def test_trial_with_a_killed_worker_is_retried_from_its_checkpoint(ray_local, mlflow_uri, tmp_path):
    storage = tmp_path / "ray_results"
    base = {
        "moco": {"dim": 16, "queue_size": 256},
        "model": {"arch": "small_cnn"},
        "data": {
            "dataset": "digits",
            "image_size": 16,
            "loader_workers": 0,
            "limit_train": 512,
            "digits": {"canvas": 16, "max_scale": 2.0},
        },  # fmt: skip
        "train": {
            "epochs": EPOCHS,
            "batch_size": 32,
            "knn_every": 0,
            "checkpoint_every": 1,
            "max_failures": 0,
        },  # fmt: skip  (the worker's death fails the trial: Tune retries it)
        "scaling": {"storage_path": str(storage)},
        "tracking": {"experiment": "sweep-retry"},
    }
    sweep = {"name": "retry", "base": base, "space": {"moco.temperature": {"grid": [0.2]}},
             "resources": {"workers": 1}, "max_failures": 1}  # fmt: skip
    path = tmp_path / "retry.yaml"
    path.write_text(yaml.safe_dump(sweep))
    spec, raw_base, (cfg, *_) = load_sweep(path)

    killed: dict[str, Any] = {}
    run_folder = storage / "retry-00000"  # the trial's Ray Train run: <sweep>-<trial number>
    killer = threading.Thread(target=kill_a_worker_after_checkpoint, args=(ray_local, run_folder, killed), daemon=True)
    killer.start()
    parent_id, failed, unfinished = run_sweep(spec, raw_base, cfg)
    killer.join(timeout=5)

    assert "pid" in killed and killed["registered_epoch"] < EPOCHS, killed
    assert (failed, unfinished) == (0, 0)
    (trial,) = tracking.child_runs(mlflow_uri, "sweep-retry", parent_id)  # the retry used the same run
    assert trial.info.status == "FINISHED" and trial.info.run_name == "retry-00000"
    client = MlflowClient(mlflow_uri)
    steps = [m.step for m in client.get_metric_history(trial.info.run_id, "loss")]
    assert sorted(set(steps)) == list(range(1, EPOCHS + 1))
    assert steps.count(1) == 1  # the retry resumed after epoch 1 instead of starting over
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_failed"] == 0
