"""The ``all_runs_finish`` check: every trial and every random-init detection run reaches its last iteration
without a NaN/inf loss (pure: synthetic runs, no Ray), and a failing random-init detection run is recorded."""

import pandas as pd
from test_reproduce_claims import BASELINES, KNN, LOSS, raw_claim, runs_frame

from mocolab import tracking
from mocolab.analysis.verdict import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED
from mocolab.reproduce import run
from mocolab.reproduce.claims import parse_claim
from mocolab.reproduce.evidence import FinishResult, evaluate_claim, trial_outcomes
from mocolab.reproduce.report import checks_markdown
from mocolab.train.nonfinite import NonFiniteLossError

NAN_TAG = f"tags.{tracking.NONFINITE_LOSS_TAG}"


def test_the_finish_check_is_reproduced_only_when_every_run_finished():
    assert FinishResult({"a": None, "b": None}).verdict == REPRODUCED
    failed = FinishResult({"a": None, "init-s1": "loss nan at iteration 56/150"})
    assert failed.verdict == NOT_REPRODUCED
    assert failed.failures == {"init-s1": "loss nan at iteration 56/150"}
    assert failed.text == "1 of 2 runs finished; init-s1: loss nan at iteration 56/150"
    assert FinishResult({}).verdict == INCONCLUSIVE  # no run at all decides nothing


def test_trial_outcomes_name_each_run_and_why_it_did_not_finish():
    runs = pd.DataFrame(
        [
            {"run_id": "1", "tags.mlflow.runName": "t-1", "status": "FINISHED", NAN_TAG: None},
            {"run_id": "2", "tags.mlflow.runName": "t-2", "status": "FAILED", NAN_TAG: "loss nan at epoch 3"},
            {"run_id": "3", "tags.mlflow.runName": "t-3", "status": "FAILED", NAN_TAG: None},
            {"run_id": "4", "tags.mlflow.runName": "t-4", "status": "KILLED", NAN_TAG: None},
            {"run_id": "5", "tags.mlflow.runName": "t-5", "status": "FINISHED", NAN_TAG: "loss inf at epoch 9"},
        ]
    )
    reasons = {"3": "detection run detection-moco-t-3: loss nan at iteration 40/150"}
    assert trial_outcomes(runs, reasons) == {
        "t-1": None,
        "t-2": "loss nan at epoch 3",
        "t-3": "detection run detection-moco-t-3: loss nan at iteration 40/150",
        "t-4": "status KILLED",
        "t-5": "loss inf at epoch 9",
    }


def test_a_failed_random_init_run_fails_the_claim_whose_checks_reproduce():
    claim, _ = parse_claim(raw_claim(all_runs_finish=True), "toy")
    runs = runs_frame(KNN, LOSS)
    verdict, results = evaluate_claim(claim, runs, BASELINES, {"init-s0": None, "init-s1": None})
    assert verdict == REPRODUCED and results[-1].text == "11 of 11 runs finished"
    verdict, results = evaluate_claim(claim, runs, BASELINES, {"init-s0": None, "init-s1": "loss nan at iteration 9"})
    assert verdict == NOT_REPRODUCED and [r.verdict for r in results[:-1]] == [REPRODUCED] * 3
    assert "init-s1: loss nan at iteration 9" in checks_markdown(results)
    without, _ = parse_claim(raw_claim(), "toy")
    assert len(evaluate_claim(without, runs, BASELINES, {"init-s1": "nan"})[1]) == len(without.checks)


def test_a_failing_random_init_detection_run_is_recorded_not_raised(monkeypatch):
    from mocolab.evaluate import pipeline

    def nan_run(cfg, source):
        raise NonFiniteLossError("detection run 'x' (MLflow run 1): NaN/inf loss nan at iteration 7/150; stopped")

    monkeypatch.setattr(pipeline, "run_detection", nan_run)
    monkeypatch.setattr("mocolab.evaluate.weights.resolve_source", lambda cfg, init: None)
    cfg = type("Cfg", (), {"tracking": type("T", (), {"run_name": "rep-det-init-s1"})})()
    outcomes = {}
    assert run._random_init_detection(cfg, outcomes) == dict.fromkeys(tracking.DETECTION_METRICS)
    assert list(outcomes) == ["detection-random-rep-det-init-s1"]
    assert "loss nan at iteration 7/150" in outcomes["detection-random-rep-det-init-s1"]
