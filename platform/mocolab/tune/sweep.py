"""A sweep (``mocolab sweep SWEEP.yaml``): Ray Tune over a sweep file, one MLflow child run per trial.

Train V2 pattern: each trial is a function trainable (holding no CPU) that runs
``orchestrate.pretrain_and_evaluate`` (a ``TorchTrainer`` per trial) and forwards its per-epoch reports to
Tune with ``TuneReportCallback``. The command (``commands/sweep.py``) runs the pre-flight step over every trial
config before Ray starts. The sweep has a parent MLflow run (``mocolab.stage=sweep``); each trial's
pretraining run is its child, named ``<sweep>-<trial number>`` so that ``--resume`` (Tuner.restore)
continues unfinished trials in the same MLflow run and Ray Train checkpoint, and never re-runs or
duplicates a finished one.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from mocolab.config import Config, ConfigError
from mocolab.tracking.masking import redact
from mocolab.tracking.names import (
    BASE_ARTIFACT,
    STAGE_SWEEP,
    STAGE_TAG,
    STOPPED_EARLY_TAG,
    SWEEP_ARTIFACT,
    SWEEP_AXES_TAG,
    SWEEP_TAG,
    TRIAL_ID_TAG,
)
from mocolab.tracking.runs import child_runs, end_run, experiment_id, find_run, log_metrics, log_params, params_of
from mocolab.tracking.source import source_tags
from mocolab.tracking.store import client_for, mlflow_client
from mocolab.tracking.system import log_usage, sweep_usage
from mocolab.tune.spec import SEED_KEY, SweepSpec, assignment_of, trial_config

TRIAL_MEMORY_BYTES = 256 * 1024**2
_COUNTER = re.compile(r"_(\d+)$")


def trial_run_name(sweep: str, trial_id: str) -> str:
    """``<sweep>-<trial number>``: Tune's trial ids end in a counter that a restored search regenerates
    identically, so a trial created again after a crash gets the same run name (ids without one are kept)."""
    match = _COUNTER.search(trial_id)
    return f"{sweep}-{match.group(1) if match else trial_id}"


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's param_space: one entry per axis (zipped axes stay one entry) plus the seeds."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, axis in spec.space.items():
        if axis.grid is not None or (axis.choice is not None and spec.search == "grid"):
            space[key] = tune.grid_search(axis.values)
        elif axis.choice is not None:
            space[key] = tune.choice(axis.choice)
        elif axis.uniform is not None:
            space[key] = tune.uniform(*axis.uniform)
        else:
            space[key] = tune.loguniform(*axis.loguniform)
    if spec.seeds:
        space[SEED_KEY] = tune.grid_search(spec.seeds) if len(spec.seeds) > 1 else spec.seeds[0]
    return space


def assignment_from(params: dict[str, Any]) -> dict[str, Any]:
    """Tune's sampled params -> dotted config keys (zipped axes unzipped)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        out.update(assignment_of(key, value) if key != SEED_KEY else {SEED_KEY: value})
    return out


def count_trials(spec: SweepSpec) -> int:
    """Trials the sweep will run: grid points x seeds x num_samples."""
    n = spec.num_samples
    for axis in spec.space.values():
        if axis.grid is not None or (axis.choice is not None and spec.search == "grid"):
            n *= len(axis.values)
    return n * max(1, len(spec.seeds or []))


def _report_final_metrics(client: Any, run_id: str) -> None:
    from ray import tune

    metrics = client.get_run(run_id).data.metrics
    tune.report({k: v for k, v in metrics.items() if not k.startswith("iter_")})


def _check_same_trial(run: Any, cfg: Config, axes: list[str]) -> None:
    """A re-created trial must carry the values its MLflow run was started with."""
    logged = run.data.params
    expected = params_of(cfg)
    changed = [k for k in axes + [SEED_KEY] if k in logged and logged[k] != expected.get(k)]
    if changed:
        raise ConfigError(
            f"run {run.info.run_name} was started with {', '.join(f'{k}={logged[k]}' for k in changed)} but "
            "the sweep now gives it other values; the sweep file changed since the first launch: "
            "start it under a new name (--name) instead of --resume"
        )


def make_trial_fn(spec: SweepSpec, base: dict[str, Any], parent_run_id: str) -> Callable[[dict], None]:
    """The function trainable of this sweep: one pretraining run (+ configured evals) per trial.

    Relative paths of the base resolve against the directory the sweep was launched from."""
    launch_dir = Path.cwd()
    source = source_tags()  # the sweep command's, not the Ray actor's that runs the trial

    def run_trial(params: dict[str, Any]) -> None:
        from ray import tune
        from ray.tune.integration.ray_train import TuneReportCallback

        from mocolab.orchestrate import pretrain_and_evaluate

        trial_id = tune.get_context().get_trial_id()
        run_name = trial_run_name(spec.name, trial_id)
        cfg = trial_config(spec, base, assignment_from(params), run_name=run_name, cwd=launch_dir)
        client = client_for(cfg.tracking.tracking_uri)
        existing = find_run(client, cfg.tracking.experiment, cfg.tracking.run_name)
        if existing is not None:
            _check_same_trial(existing, cfg, spec.axes)
            if existing.info.status == "FINISHED":  # finished before an interruption: keep it, run nothing
                _report_final_metrics(client, existing.info.run_id)
                return
        run_id = pretrain_and_evaluate(
            cfg,
            parent_run_id=parent_run_id,
            extra_tags={**source, SWEEP_TAG: spec.name, TRIAL_ID_TAG: trial_id},
            callbacks=[TuneReportCallback()],
        )
        _report_final_metrics(client, run_id)

    return run_trial


def _trial_status_callback(spec: SweepSpec, cfg: Config):
    """A Tune callback (driver side) that gives each trial's MLflow run its final status."""
    from ray import tune

    class MlflowTrialStatus(tune.Callback):
        def __init__(self, sweep: str, uri: str, experiment: str):
            self.sweep, self.uri, self.experiment = sweep, uri, experiment

        def _set_status(self, trial: Any, status: str, only_if_running: bool) -> None:
            client = mlflow_client(self.uri)
            run = find_run(client, self.experiment, trial_run_name(self.sweep, trial.trial_id))
            if run is None or (only_if_running and run.info.status != "RUNNING"):
                return
            if status == "FINISHED":  # still running when Tune completed it: stopped by the scheduler
                client.set_tag(run.info.run_id, STOPPED_EARLY_TAG, "true")
            client.set_terminated(run.info.run_id, status=status)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._set_status(trial, "FAILED", only_if_running=False)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._set_status(trial, "FINISHED", only_if_running=True)

    return MlflowTrialStatus(spec.name, cfg.tracking.tracking_uri, cfg.tracking.experiment)


def find_sweep_run(uri: str, experiment: str, sweep: str) -> Any | None:
    """The parent run of sweep ``sweep`` in ``experiment``, or None."""
    client = client_for(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{STAGE_TAG}` = '{STAGE_SWEEP}' and tags.`{SWEEP_TAG}` = '{sweep}'",
        order_by=["attributes.start_time DESC"],
    )
    return runs[0] if runs else None


def start_sweep_run(
    spec: SweepSpec, base: dict[str, Any], cfg: Config, resume: bool, extra_tags: dict[str, str] | None = None
) -> str:
    """Create the sweep's parent run (with ``extra_tags``), or reopen it with ``resume``; refuse a name already used."""
    uri, experiment = cfg.tracking.tracking_uri, cfg.tracking.experiment
    existing = find_sweep_run(uri, experiment, spec.name)
    client = client_for(uri)
    if resume:
        if existing is None:
            raise ConfigError(
                f"--resume: no sweep '{spec.name}' in experiment '{experiment}' ({redact(uri)}); drop --resume"
            )
        client.update_run(existing.info.run_id, status="RUNNING")
        return existing.info.run_id
    if existing is not None:
        raise ConfigError(
            f"sweep '{spec.name}' already exists in experiment '{experiment}' (MLflow run {existing.info.run_id}); "
            "continue it with --resume or start another with --name NEW_NAME"
        )
    tags = {
        STAGE_TAG: STAGE_SWEEP,
        SWEEP_TAG: spec.name,
        SWEEP_AXES_TAG: ",".join(spec.axes),
        **source_tags(),
    }
    tags.update(extra_tags or {})
    run = client.create_run(experiment_id(client, experiment), run_name=spec.name, tags=tags)
    run_id = run.info.run_id
    log_params(
        client,
        run_id,
        {
            "search": spec.search,
            "num_samples": str(spec.num_samples),
            "scheduler": spec.scheduler.type,
            "seeds": str(spec.seeds),
            "num_trials": str(count_trials(spec)),
        },
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in ((SWEEP_ARTIFACT, spec.model_dump(mode="json")), (BASE_ARTIFACT, base)):
            path = Path(tmp) / name
            path.write_text(redact(yaml.safe_dump(data, sort_keys=False)))
            client.log_artifact(run_id, str(path))
    return run_id


def _search_alg(spec: SweepSpec) -> Any:
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=spec.search_seed)  # metric and mode come from TuneConfig
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=spec.search_seed, max_concurrent=spec.max_concurrent_trials)


def console_settings(spec: SweepSpec, cfg: Config) -> dict[str, Any]:
    """The RunConfig fields of the sweep's callbacks and console: the trial runs' MLflow status, one line per trial
    start and end (``tune/progress.py``), Tune's own tables of every trial's config and results only with
    ``--verbose``."""
    from mocolab.console import is_verbose
    from mocolab.tune.progress import trial_lines_callback

    lines = trial_lines_callback(partial(trial_run_name, spec.name))
    return {"callbacks": [_trial_status_callback(spec, cfg), lines], "verbose": None if is_verbose() else 0}


def build_tuner(spec: SweepSpec, base: dict[str, Any], cfg: Config, parent_run_id: str, resume: bool) -> Any:
    """A new Tuner for the sweep, or with ``resume`` the one restored from its Tune state, if saved; either way with
    this command's :func:`console_settings`. Tune's CSV/JSON/TensorBoard result files are off: MLflow holds the
    runs."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from mocolab.console import is_verbose

    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # both read by Tuner.fit() in this process
    if not is_verbose():  # Tune's new console prints its settings table even at verbose=0; the legacy one is silent
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    trainable = tune.with_resources(make_trial_fn(spec, base, parent_run_id), {"CPU": 0, "memory": TRIAL_MEMORY_BYTES})
    path = os.path.join(cfg.scaling.storage_path, spec.name)
    if resume and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable)
        # Tune restores the RunConfig it saved at the first launch and has no public setter: this launch's console
        run_config = tuner._local_tuner.get_run_config()
        for field, value in console_settings(spec, cfg).items():
            setattr(run_config, field, value)
        return tuner
    if resume:  # interrupted before Tune saved any state: start the trials under the same parent run
        print(f"--resume: no Tune state at {path} yet; starting the trials afresh", flush=True)
    elif tune.Tuner.can_restore(path):
        raise ConfigError(f"sweep '{spec.name}' has Tune state at {path}; use --resume or --name NEW_NAME")
    scheduler = None
    if spec.scheduler.type == "asha":
        scheduler = ASHAScheduler(
            grace_period=spec.scheduler.grace_period,
            reduction_factor=spec.scheduler.reduction_factor,
            max_t=cfg.train.epochs,
        )
    uses_metric = scheduler is not None or spec.search == "optuna"
    return tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=spec.scheduler.metric if uses_metric else None,
            mode="max" if uses_metric else None,
            search_alg=_search_alg(spec),
            scheduler=scheduler,
            num_samples=spec.num_samples,
            max_concurrent_trials=spec.max_concurrent_trials,
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=cfg.scaling.storage_path,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            **console_settings(spec, cfg),
        ),
    )


def close_stopped_trials(uri: str, experiment: str, parent_run_id: str) -> int:
    """Mark KILLED the trial runs still RUNNING once Tune has returned: their trial processes were stopped (Ctrl-C,
    a failed sweep) without a chance to close them. Returns how many."""
    client = mlflow_client(uri)
    stopped = [run for run in child_runs(uri, experiment, parent_run_id) if run.info.status == "RUNNING"]
    for run in stopped:
        client.set_terminated(run.info.run_id, status="KILLED")
    return len(stopped)


def run_sweep(
    spec: SweepSpec, base: dict[str, Any], cfg: Config, resume: bool = False, extra_tags: dict[str, str] | None = None
) -> tuple[str, int, int]:
    """Run (or resume) the sweep on the current Ray cluster; ``extra_tags`` go on a new parent run
    (``mocolab reproduce`` makes it the child of its own run).

    Returns ``(parent MLflow run id, failed trials, unfinished trials)``; unfinished trials (an
    interrupted sweep) leave the parent run and their own runs KILLED, to be continued with ``--resume``."""
    parent_run_id = start_sweep_run(spec, base, cfg, resume, extra_tags)
    uri = cfg.tracking.tracking_uri
    try:
        results = build_tuner(spec, base, cfg, parent_run_id, resume).fit()
    except BaseException:
        from mocolab.runtime import sigint_held

        with sigint_held():
            close_stopped_trials(uri, cfg.tracking.experiment, parent_run_id)
            end_run(uri, parent_run_id, "KILLED")
        raise
    close_stopped_trials(uri, cfg.tracking.experiment, parent_run_id)
    # Tune marks the trials it stops on an interruption TERMINATED too: count finished ones in MLflow
    failed = results.num_errors
    children = child_runs(uri, cfg.tracking.experiment, parent_run_id)
    finished = sum(1 for run in children if run.info.status == "FINISHED")
    unfinished = max(0, count_trials(spec) - finished - failed)
    client = client_for(uri)
    log_metrics(client, parent_run_id, {"trials": len(results), "trials_failed": failed}, step=0)
    log_usage(client, parent_run_id, sweep_usage(uri, cfg.tracking.experiment, parent_run_id))
    end_run(uri, parent_run_id, "KILLED" if unfinished else "FINISHED")
    return parent_run_id, failed, unfinished
