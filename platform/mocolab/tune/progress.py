"""A sweep's console: one line when a trial starts and one when it ends, with its setting and headline metrics.

Tune's own console (its boxed tables of every trial's config and results) is off unless ``--verbose``
(``tune/sweep.build_tuner``); these lines are what a quiet sweep shows beside mocolab's own progress.
"""

from __future__ import annotations

from typing import Any

from mocolab.tracking.names import DETECTION_METRICS, KNN_TOP1, LINCLS_FAST_METRICS, LINCLS_METRICS
from mocolab.tune.spec import SEED_KEY, assignment_of

TRIAL_METRICS = (KNN_TOP1, LINCLS_METRICS[0], LINCLS_FAST_METRICS[0], DETECTION_METRICS[0])
"""The metrics a trial's end line shows, when the trial reported them."""


def setting_text(params: dict[str, Any]) -> str:
    """A trial's setting from Tune's params: ``moco.momentum=0.9 seed=0`` (zipped axes unzipped, the seed last)."""
    assignment: dict[str, Any] = {}
    for key, value in params.items():
        assignment.update(assignment_of(key, value) if key != SEED_KEY else {})
    parts = [f"{key}={value}" for key, value in assignment.items()]
    if SEED_KEY in params:
        parts.append(f"seed={params[SEED_KEY]}")
    return " ".join(parts) or "base config"


def metrics_text(result: dict[str, Any]) -> str:
    """``knn_top1 71.25  lincls_fast_top1 80.10`` for the headline metrics in ``result`` (empty if none)."""
    return "  ".join(f"{name} {result[name]:.2f}" for name in TRIAL_METRICS if isinstance(result.get(name), float))


def trial_line(run_name: str, params: dict[str, Any], event: str, result: dict[str, Any] | None = None) -> str:
    """``[mocolab] trial tiny-00001 (moco.momentum=0.9 seed=0) done: knn_top1 71.25``."""
    metrics = metrics_text(result or {})
    return f"[mocolab] trial {run_name} ({setting_text(params)}) {event}" + (f": {metrics}" if metrics else "")


def trial_lines_callback(run_name_of: Any) -> Any:
    """A Tune callback (driver side) that prints :func:`trial_line` when a trial starts, ends, fails or is retried;
    ``run_name_of(trial_id)`` names the trial as its MLflow run."""
    from ray import tune

    class TrialLines(tune.Callback):
        def _print(self, trial: Any, event: str, result: dict[str, Any] | None = None) -> None:
            print(trial_line(run_name_of(trial.trial_id), trial.config, event, result), flush=True)

        def on_trial_start(self, iteration, trials, trial, **info):
            self._print(trial, "started")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._print(trial, "done", trial.last_result)

        def on_trial_recover(self, iteration, trials, trial, **info):
            self._print(trial, "failed; retrying it")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._print(trial, f"failed (details: {trial.error_file or 'in the log above'})")

    return TrialLines()
