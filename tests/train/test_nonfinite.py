"""The NaN/inf path shared by the training loops (train/nonfinite.py), without Ray: the finiteness check, the
MLflow tag, the driver's error and FAILED status, and the one line `mocolab` prints for it."""

import math

import pytest
import torch
from mlflow import MlflowClient

from mocolab import cli, tracking
from mocolab.config import build_config
from mocolab.train.nonfinite import (
    LossGuard,
    NonFiniteLossError,
    checked_mean_loss,
    raise_if_nonfinite,
    record_nonfinite,
    worker_mean,
)


def test_worker_mean_on_one_worker():
    assert worker_mean(torch.tensor(2.5, requires_grad=True), world_size=1) == 2.5
    assert math.isnan(worker_mean(torch.tensor(float("nan")), world_size=1))
    assert worker_mean(torch.tensor(float("-inf")), world_size=1) == float("-inf")


def test_checked_mean_loss_passes_a_finite_loss_and_records_an_injected_nan(mlflow_uri):
    run_id = _eval_run(mlflow_uri)
    where = lambda value: f"loss {value} at step 3"  # noqa: E731
    assert checked_mean_loss(torch.tensor(1.5), 1, 0, 2, 3, mlflow_uri, run_id, where) == 1.5
    assert tracking.NONFINITE_LOSS_TAG not in MlflowClient(mlflow_uri).get_run(run_id).data.tags
    assert checked_mean_loss(torch.tensor(1.5), 1, 0, 3, 3, mlflow_uri, run_id, where) is None  # injected at step 3
    assert MlflowClient(mlflow_uri).get_run(run_id).data.tags[tracking.NONFINITE_LOSS_TAG] == "loss nan at step 3"


def test_loss_guard_closes_the_bar_only_when_the_loss_is_not_finite(mlflow_uri):
    class Bar:
        closed = 0

        def close(self):
            self.closed += 1

    bar = Bar()
    guard = LossGuard(bar, world_size=1, rank=0, inject_at=4, tracking_uri=mlflow_uri, run_id=_eval_run(mlflow_uri))
    assert guard.mean(torch.tensor(0.5), 3, lambda value: "unused") == 0.5 and bar.closed == 0
    assert guard.mean(torch.tensor(0.5), 4, lambda value: f"loss {value} at step 4") is None and bar.closed == 1


def _eval_run(uri: str) -> str:
    cfg = build_config({"tracking": {"experiment": "nan", "run_name": "r", "tracking_uri": uri}})
    return tracking.start_eval_run(cfg, "detection", {}, init="random", run_name="detection-random-r")


def test_recorded_nonfinite_loss_fails_the_run_with_where_and_fix(mlflow_uri):
    run_id = _eval_run(mlflow_uri)
    raise_if_nonfinite(mlflow_uri, run_id, "detection run 'x'", "Lower the lr.")  # nothing recorded: no error
    assert MlflowClient(mlflow_uri).get_run(run_id).info.status == "RUNNING"

    record_nonfinite(mlflow_uri, run_id, "loss nan at iteration 56/100 (classifier 14.2)")
    with pytest.raises(NonFiniteLossError) as err:
        raise_if_nonfinite(mlflow_uri, run_id, "detection run 'x'", "Lower the lr.")
    assert str(err.value) == (
        "detection run 'x': NaN/inf loss nan at iteration 56/100 (classifier 14.2); stopped without retry. "
        "Lower the lr."
    )
    run = MlflowClient(mlflow_uri).get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[tracking.NONFINITE_LOSS_TAG] == "loss nan at iteration 56/100 (classifier 14.2)"


def test_mocolab_prints_one_line_and_exits_1(monkeypatch, command_output, tmp_path):
    import mocolab.commands.detect as detect_command

    def diverge(cfg, source):
        raise NonFiniteLossError(
            "detection run 'x': NaN/inf loss nan at iteration 3/3 (...); stopped without retry. Fix."
        )

    monkeypatch.setattr(detect_command, "run_detection", diverge)
    config = tmp_path / "det.yaml"
    config.write_text("eval:\n  detection:\n    iterations: 3\n    warmup_iters: 1\n    data: {made_digits: true}\n")
    assert cli.main(["detect", str(config), "--init", "random"]) == 1
    err = command_output().err  # without lines an earlier test's Ray workers may still be streaming
    assert (
        err
        == "mocolab detect: detection run 'x': NaN/inf loss nan at iteration 3/3 (...); stopped without retry. Fix.\n"
    )
