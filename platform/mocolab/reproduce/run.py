"""A reproduction (``mocolab reproduce``): the MoCo papers' claims at CPU scale, >= 3 seeds per setting, with verdicts.

Every claim (``experiments/reproduce/<claim>.yaml``, see :mod:`mocolab.reproduce.claims`) runs as a sweep
(:mod:`mocolab.tune.sweep`, one Ray Train worker per trial) whose MLflow run is a child of one parent run
(``mocolab.stage=reproduce``) and carries ``mocolab.claim`` and ``mocolab.verdict``. The random-init encoder of
every seed is measured under the same kNN protocol. The report (``report.md`` and one PNG per claim) goes to
``--out`` and onto the parent run. ``--resume`` continues the latest (or a named) reproduction: finished claims
are read back, unfinished sweeps resume where they stopped.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mocolab import tracking
from mocolab.config import Config, ConfigError
from mocolab.reproduce.claims import CLAIMS_DIR, Claim, grid_settings, load_claim
from mocolab.reproduce.estimate import detection_seconds, minutes, schedule_seconds, trial_seconds
from mocolab.tune.spec import SEED_KEY, SweepSpec, prepare_sweep, trial_config

DEFAULT_EXPERIMENT = "reproduce"
FINDINGS = CLAIMS_DIR / "FINDINGS.md"  # the investigations behind the claims, appended to every report
BASELINE_PREFIX = "random_init_"  # random_init_<metric> on each claim's sweep run, step = seed


class ReproductionInterrupted(RuntimeError):
    """A claim's sweep stopped with unfinished trials: continue with ``--resume``."""


@dataclass
class Plan:
    """One claim, ready to run: its validated sweep and the config of every trial."""

    claim: Claim
    path: Path
    spec: SweepSpec
    base: dict[str, Any]
    first: Config
    trials: list[Config]
    seconds: float


def plan_claim(name: str, run_name: str, seeds: list[int] | None, overrides: list[str], experiment: str) -> Plan:
    """Load claim ``name``, name its sweep ``<run_name>-<claim>``, apply ``seeds`` and ``overrides``, validate every
    trial and estimate its wall time (with ``eval.detection``: each trial's detection run and, after the sweep, the
    random-init one of each seed). Every trial must share the images and the architecture (one random-init
    baseline per seed serves all rows)."""
    from mocolab.preflight import preflight

    claim, spec, path = load_claim(name)
    updates: dict[str, Any] = {"name": f"{run_name}-{claim.claim}"}
    if seeds is not None:
        updates["seeds"] = seeds
    spec = spec.model_copy(update=updates)
    base, trials = prepare_sweep(spec, path.parent, [*overrides, f"tracking.experiment={experiment}"])
    seeds = {"lincls": {"seed"}, "detection": {"seed"}}  # follow train.seed: a row's seeds are the baseline's
    shared = {
        (
            t.data.model_dump_json(exclude={"augment"}),
            t.model.arch,
            t.train.linear_probe,
            t.eval.model_dump_json(exclude=seeds),
        )
        for t in trials
    }
    if len(shared) > 1:
        raise ConfigError(
            f"{path}: every row of a claim must use the same images (data.* but data.augment), model.arch, "
            "train.linear_probe and eval: one random-init baseline per seed serves all rows; split the claim"
        )
    _check_metrics_measured(claim, trials[0], path)
    checked = preflight(trials, ("pretrain",), quiet=True)  # data, mechanisms against the data, storage, tracking
    key = trials[0].data.model_dump_json()
    sizes = checked.train_images[key], checked.test_images[key]
    durations = [trial_seconds(t, *sizes) + detection_seconds(t) for t in trials]
    random_init = len(spec.seeds or [trials[0].train.seed]) * detection_seconds(trials[0])  # a run per seed, after
    seconds = schedule_seconds(durations, spec.max_concurrent_trials) + random_init
    return Plan(claim, path, spec, base, trials[0], trials, seconds)


def measured_metrics(cfg: Config) -> set[str]:
    """The accuracy metrics a trial of ``cfg`` logs (and its random-init baseline gets)."""
    metrics = {tracking.KNN_TOP1} if cfg.train.knn_every and cfg.knn_data is not None else set()
    if cfg.train.linear_probe:
        metrics.add(tracking.LINCLS_FAST_METRICS[0])
    if cfg.eval.detection is not None:
        metrics.update(tracking.DETECTION_METRICS)
    return metrics


def _check_metrics_measured(claim: Claim, cfg: Config, path: Path) -> None:
    needs = {
        tracking.LINCLS_FAST_METRICS[0]: "train.linear_probe: true",
        **{name: "an eval.detection section" for name in tracking.DETECTION_METRICS},
        tracking.KNN_TOP1: "train.knn_every > 0 (and labelled data)",
    }
    for check in claim.checks:
        metric = claim.metric_of(check)
        if metric in needs and metric not in measured_metrics(cfg):
            raise ConfigError(
                f"{path}: check '{check.name}' uses {metric}, which the trials do not log; set {needs[metric]}"
            )


def plan_text(plans: list[Plan]) -> str:
    """The plan: per claim, its trials and expected time, and the total."""
    lines = []
    for p in plans:
        lines.append(
            f"  {p.claim.claim:<17} {len(p.trials):>3} trials, {p.spec.max_concurrent_trials} at a time: "
            f"~{minutes(p.seconds)}  ({p.claim.title})"
        )
    total = sum(p.seconds for p in plans)
    lines.append(
        f"  expected total ~{minutes(total)} on 2 quiet CPU cores (per-trial estimate: mocolab.reproduce.estimate)"
    )
    return "\n".join(lines)


def find_parent(uri: str, experiment: str, name: str | None) -> Any | None:
    """The reproduction parent run called ``name``, or the newest one when ``name`` is None."""
    client = tracking.client_for(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    query = f"tags.`{tracking.STAGE_TAG}` = '{tracking.STAGE_REPRODUCE}'"
    if name:
        query += f" and attributes.run_name = '{name}'"
    runs = client.search_runs(
        [exp.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"], max_results=1
    )
    return runs[0] if runs else None


def start_parent(
    uri: str, experiment: str, run_name: str, claims: list[str], seeds: list[int] | None, command: str
) -> str:
    """Create the parent run of a reproduction."""
    client = tracking.client_for(uri)
    tags = {tracking.STAGE_TAG: tracking.STAGE_REPRODUCE}
    commit = tracking.git_commit()
    if commit:
        tags[tracking.GIT_COMMIT_TAG] = commit
    run = client.create_run(tracking.experiment_id(client, experiment), run_name=run_name, tags=tags)
    from mocolab.analysis.verdict import ALPHA

    tracking.log_params(
        client,
        run.info.run_id,
        {
            "claims": ",".join(claims),
            "seeds": "claim files" if seeds is None else ",".join(map(str, seeds)),
            "alpha": str(ALPHA),
            "command": command,
        },
    )
    return run.info.run_id


def run_claim(plan: Plan, parent_id: str) -> str:
    """Run (or resume, or read back when finished) the claim's sweep under the parent; its MLflow run id."""
    from mocolab.tune.sweep import find_sweep_run, run_sweep

    cfg = plan.first
    existing = find_sweep_run(cfg.tracking.tracking_uri, cfg.tracking.experiment, plan.spec.name)
    if existing is not None and existing.info.status == "FINISHED":
        print(
            f"[reproduce] {plan.claim.claim}: sweep '{plan.spec.name}' already finished; reading its runs", flush=True
        )
        return existing.info.run_id
    tags = {tracking.PARENT_RUN_TAG: parent_id, tracking.CLAIM_TAG: plan.claim.claim}
    sweep_id, failed, unfinished = run_sweep(plan.spec, plan.base, cfg, resume=existing is not None, extra_tags=tags)
    if unfinished:
        raise ReproductionInterrupted(f"sweep '{plan.spec.name}' stopped with {unfinished} unfinished trial(s)")
    if failed:
        print(
            f"[reproduce] {plan.claim.claim}: {failed} trial(s) failed; their seeds are left out of the pairs",
            flush=True,
        )
    return sweep_id


def random_init_baselines(plan: Plan) -> tuple[pd.DataFrame, dict[str, str | None]]:
    """The random-init encoder of every seed (the pretraining runs' starting points) under the trials' protocols:
    kNN top-1, the linear probe with ``train.linear_probe``, AP/AP50/AP75 with ``eval.detection`` (a detection run
    from random init per seed, with that seed's detection seed, as the trial of that seed). Returns the metrics
    (index: seed; columns: metric) and each detection run's name -> None, or why it failed: a failed run (e.g. a
    NaN/inf loss) is recorded, its seed's AP left out, not raised."""
    from mocolab.quickstart import random_init_metrics

    first_setting = grid_settings(plan.spec)[0]
    rows, outcomes = {}, {}
    for seed in plan.spec.seeds or [plan.first.train.seed]:
        name = f"{plan.spec.name}-init-s{seed}"
        cfg = trial_config(plan.spec, plan.base, {**first_setting, SEED_KEY: seed}, run_name=name)
        rows[seed] = random_init_metrics(cfg)
        if cfg.eval.detection is not None:
            rows[seed].update(_random_init_detection(cfg, outcomes))
    return pd.DataFrame.from_dict(rows, orient="index", dtype=float).sort_index(), outcomes


def _random_init_detection(cfg: Config, outcomes: dict[str, str | None]) -> dict[str, float | None]:
    """AP/AP50/AP75 of a detection run from random init per ``cfg``; records in ``outcomes`` its run's name and
    None, or the first line of what stopped it (then the metrics are None)."""
    from mocolab.evaluate.pipeline import run_detection
    from mocolab.evaluate.weights import resolve_source

    name = f"detection-random-{cfg.tracking.run_name}"
    try:
        detection = run_detection(cfg, resolve_source(cfg, init="random"))
    except Exception as err:  # the run is marked FAILED; the claim's finish check reports it
        why = (str(err).strip().splitlines() or [type(err).__name__])[0]
        print(f"[reproduce] {name} failed: {why}", flush=True)
        outcomes[name] = why
        return dict.fromkeys(tracking.DETECTION_METRICS)
    outcomes[name] = None
    return {metric: detection.get(metric) for metric in tracking.DETECTION_METRICS}


def failure_reasons(uri: str, runs: pd.DataFrame) -> dict[str, str]:
    """Why each trial run that did not finish failed, when one of its evaluation runs recorded a NaN/inf loss:
    ``run_id`` -> ``<stage> run <name>: <where>``."""
    client = tracking.client_for(uri)
    reasons = {}
    for _, row in runs[runs["status"] != "FINISHED"].iterrows():
        evals = client.search_runs(
            [row["experiment_id"]], filter_string=f"tags.`{tracking.PRETRAIN_RUN_TAG}` = '{row['run_id']}'"
        )
        for run in evals:
            where = run.data.tags.get(tracking.NONFINITE_LOSS_TAG)
            if where:
                stage = run.data.tags.get(tracking.STAGE_TAG, "evaluation")
                reasons[row["run_id"]] = f"{stage} run {run.info.run_name}: {where}"
    return reasons


def evaluate_plan(plan: Plan, sweep_id: str):
    """Read the claim's runs, measure the baselines, decide the checks, tag and annotate the sweep run."""
    from mocolab.analysis.runs import load_sweep_runs, metric_history
    from mocolab.reproduce.evidence import CURVE_METRICS, evaluate_claim, rows_table, settings_of_runs, with_curves
    from mocolab.reproduce.report import ClaimReport

    uri = plan.first.tracking.tracking_uri
    _, runs = load_sweep_runs(uri, plan.spec.name)
    labels = settings_of_runs(runs, plan.claim)
    histories = {name: metric_history(uri, list(runs["run_id"]), name) for name, _ in CURVE_METRICS.values()}
    runs = with_curves(runs, histories)
    baselines, baseline_outcomes = random_init_baselines(plan)
    reasons = failure_reasons(uri, runs) if plan.claim.all_runs_finish else {}
    verdict, results = evaluate_claim(plan.claim, runs, baselines, baseline_outcomes, reasons)
    history = histories["loss"][histories["loss"]["run_id"].isin(labels.index)]
    curves = history.assign(
        setting=history["run_id"].map(labels),
        seed=history["run_id"].map(runs.set_index("run_id")[f"params.{SEED_KEY}"]),
    )
    client = tracking.client_for(uri)
    for seed, values in baselines.iterrows():
        logged = {f"{BASELINE_PREFIX}{name}": value for name, value in values.items() if pd.notna(value)}
        tracking.log_metrics(client, sweep_id, logged, step=int(seed))
    client.set_tag(sweep_id, tracking.VERDICT_TAG, verdict)
    tracking.log_file(uri, sweep_id, plan.path, "claim")
    table = rows_table(plan.claim, runs)
    return ClaimReport(plan.claim, plan.spec.name, table, baselines, results, verdict, curves)


def report_header(run_name: str, command: str, seconds: float, plans: list[Plan]) -> str:
    from mocolab.analysis.verdict import ALPHA

    commit = tracking.git_commit() or "unknown"
    level = round(100 * (1 - 2 * ALPHA))
    expected = minutes(sum(p.seconds for p in plans))
    return f"""# Reproduction of the MoCo papers' claims at CPU scale

`{command}` (reproduction `{run_name}`, commit `{commit[:12]}`,
{time.strftime("%Y-%m-%d %H:%M")}; this invocation {minutes(seconds)} wall, expected {expected} on 2 quiet cores).

**Rule.** Every setting runs with the same seeds; a check pairs two quantities seed by seed and puts a two-sided
{level}% Student-t interval on their mean difference (so each bound is a one-sided test at alpha = {ALPHA}):
*reproduced* when the interval lies on the claimed side of the threshold (0 or the stated margin), *not
reproduced* when it lies on the other side, *inconclusive* when it straddles it. A claim is reproduced when all
its checks are, not reproduced when any is not. The metric is each claim's (named in its section): the kNN
monitor's top-1 on the made digits task's test split after the last epoch (weighted kNN, k=200), the linear probe,
or a detection claim's box AP (COCO AP, AP50, AP75 on its val split); the paper's are ImageNet linear top-1 and
VOC AP: compare directions, not values. "Random init" is the same encoder at its initialization (same seed),
measured the same way (detection: fine-tuned from it under the same settings and detection seed). A claim with the
finish check also requires every run to reach its last iteration without a NaN/inf loss.
"""


def reproduce(
    plans: list[Plan],
    parent: Any | None,
    run_name: str,
    names: list[str],
    seeds: list[int] | None,
    command: str,
    experiment: str,
    out: Path | None,
) -> int:
    """Run the ``plans`` under one parent run (``parent``'s when resuming), write the report to ``out`` (default
    ``reports/<run_name>/``) and log it on the parent; 1 when a claim's sweep stopped with unfinished trials."""
    from mocolab.runtime import ensure_ray

    uri = plans[0].first.tracking.tracking_uri
    ensure_ray()  # before the parent run: a Ray that does not start leaves no run behind
    parent_id = parent.info.run_id if parent else start_parent(uri, experiment, run_name, names, seeds, command)
    tracking.client_for(uri).update_run(parent_id, status="RUNNING")
    started = time.time()
    reports = []
    try:
        for plan in plans:
            print(
                f"[reproduce] {plan.claim.claim}: {len(plan.trials)} trials, expected ~{minutes(plan.seconds)}",
                flush=True,
            )
            claim_started = time.time()
            sweep_id = run_claim(plan, parent_id)
            reports.append(evaluate_plan(plan, sweep_id))
            print(
                f"[reproduce] {plan.claim.claim}: {reports[-1].verdict} ({minutes(time.time() - claim_started)})",
                flush=True,
            )
    except BaseException as err:
        tracking.end_run(uri, parent_id, "KILLED")
        print(f"[reproduce] interrupted; continue with: mocolab reproduce --resume {run_name}", file=sys.stderr)
        if isinstance(err, ReproductionInterrupted):
            print(f"[reproduce] {err}", file=sys.stderr)
            return 1
        raise
    from mocolab.reproduce.report import write_report

    out = out or Path("reports") / run_name
    findings = FINDINGS.read_text() if FINDINGS.is_file() else ""
    report = write_report(reports, out, report_header(run_name, command, time.time() - started, plans), findings)
    client = tracking.client_for(uri)
    for path in sorted(out.iterdir()):
        client.log_artifact(parent_id, str(path), tracking.REPORT_ARTIFACT_DIR)
    counts = {
        f"claims_{v}": sum(r.verdict == v for r in reports) for v in ("reproduced", "not_reproduced", "inconclusive")
    }
    tracking.log_metrics(client, parent_id, {**counts, "wall_seconds": time.time() - started}, step=0)
    tracking.end_run(uri, parent_id, "FINISHED")
    print(f"[reproduce] report: {report}  (MLflow parent run {parent_id})")
    for r in reports:
        print(f"  {r.claim.claim:<12} {r.verdict}")
    return 0
