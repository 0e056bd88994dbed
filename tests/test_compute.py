"""Compute accounting: the arithmetic (``mocolab/compute.py``), its MLflow metrics on a run and a sweep's parent, and
the report's accuracy-against-device-hours plot. No Ray: runs are made with the MLflow client."""

from __future__ import annotations

import time

import pytest
from analysis_store import make_momentum_sweep
from mlflow import MlflowClient

from mocolab import tracking
from mocolab.analysis.report import make_report
from mocolab.compute import ComputeUsage, devices_per_worker, total, usage
from mocolab.config import build_config


def test_usage_counts_every_worker_and_its_devices():
    gpu = usage(1800.0, num_workers=8, devices=devices_per_worker(True, 10), price_per_device_hour=2.5)
    assert gpu == ComputeUsage(worker_seconds=14400.0, device_hours=4.0, cost=10.0)
    cpu = usage(360.0, num_workers=2, devices=devices_per_worker(False, 4))
    assert cpu == ComputeUsage(worker_seconds=720.0, device_hours=0.8, cost=None)
    with pytest.raises(ValueError, match="num_workers=0"):
        usage(1.0, num_workers=0, devices=1.0)


def test_totals_add_worker_seconds_device_hours_and_the_known_costs():
    assert total([ComputeUsage(10.0, 1.0, 2.0), ComputeUsage(5.0, 0.5, None)]) == ComputeUsage(15.0, 1.5, 2.0)
    assert total([ComputeUsage(1.0, 0.1)]).cost is None
    assert total([]) == ComputeUsage(0.0, 0.0, None)


def _cfg(tmp_path, **tracking_section):
    return build_config(
        {
            "scaling": {"num_workers": 2, "cpus_per_worker": 2, "storage_path": str(tmp_path / "ray_results")},
            "tracking": {
                "experiment": "compute",
                "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                **tracking_section,
            },
        }
    )


def test_each_attempt_adds_its_compute_to_the_run_even_when_it_fails(tmp_path):
    cfg = _cfg(tmp_path, price_per_device_hour=3.6)
    run_id, _ = tracking.start_pretrain_run(cfg)
    client = MlflowClient(cfg.tracking.tracking_uri)
    with tracking.compute_recorded(cfg, run_id, num_workers=2):
        time.sleep(0.2)
    first = client.get_run(run_id).data.metrics
    assert 0.4 <= first[tracking.WORKER_SECONDS] < 4.0  # 2 workers x >= 0.2 s
    assert first[tracking.DEVICE_HOURS] == pytest.approx(first[tracking.WORKER_SECONDS] * 2 / 3600)  # 2 CPUs each
    assert first[tracking.COST] == pytest.approx(first[tracking.DEVICE_HOURS] * 3.6)
    with pytest.raises(RuntimeError, match="worker lost"), tracking.compute_recorded(cfg, run_id, num_workers=2):
        time.sleep(0.2)
        raise RuntimeError("worker lost")
    second = client.get_run(run_id).data.metrics
    assert second[tracking.WORKER_SECONDS] >= first[tracking.WORKER_SECONDS] + 0.4  # the resumed attempt adds up
    assert [m.step for m in client.get_metric_history(run_id, tracking.DEVICE_HOURS)] == [0, 0]  # once per attempt


def test_a_run_without_a_price_logs_no_cost(tmp_path):
    cfg = _cfg(tmp_path)
    run_id, _ = tracking.start_pretrain_run(cfg)
    with tracking.compute_recorded(cfg, run_id, num_workers=1):
        pass
    metrics = MlflowClient(cfg.tracking.tracking_uri).get_run(run_id).data.metrics
    assert tracking.DEVICE_HOURS in metrics and tracking.COST not in metrics


def test_a_sweeps_compute_sums_its_trials_and_their_evaluations(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    trials = make_momentum_sweep(uri, experiment="sweeps")
    parent = client.get_run(trials[0]).data.tags[tracking.PARENT_RUN_TAG]
    for run_id in trials[:3]:
        tracking.log_usage(client, run_id, ComputeUsage(100.0, 0.5, 1.0))
    exp_id = tracking.experiment_id(client, "sweeps")
    lincls = client.create_run(
        exp_id, tags={tracking.STAGE_TAG: tracking.STAGE_LINCLS, tracking.PRETRAIN_RUN_TAG: trials[0]}
    ).info.run_id
    tracking.log_usage(client, lincls, ComputeUsage(10.0, 0.25, None))
    other = client.create_run(
        exp_id, tags={tracking.STAGE_TAG: tracking.STAGE_LINCLS, tracking.PRETRAIN_RUN_TAG: "not-a-trial"}
    ).info.run_id
    tracking.log_usage(client, other, ComputeUsage(1000.0, 9.0, None))
    assert tracking.sweep_usage(uri, "sweeps", parent) == ComputeUsage(310.0, 1.75, 3.0)


def test_report_plots_accuracy_against_device_hours_when_runs_logged_them(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    trials = make_momentum_sweep(uri, name="costed", experiment="sweeps")
    _, out = make_report(uri, sweep="costed", out=tmp_path / "before", log_to_parent=False)
    assert not (out / "accuracy_vs_device_hours.png").exists()  # no run logged its compute
    for i, run_id in enumerate(trials):
        tracking.log_usage(client, run_id, ComputeUsage(100.0 * (i + 1), 0.1 * (i + 1)))
    s, out = make_report(uri, sweep="costed", out=tmp_path / "after", log_to_parent=False)
    assert (out / "accuracy_vs_device_hours.png").stat().st_size > 0
    assert "accuracy_vs_device_hours.png" in (out / "report.md").read_text()
