"""From a claim's finished runs to its table rows and check verdicts: pure pandas on a runs frame
(``mlflow.search_runs`` columns: ``params.<dotted key>``, ``metrics.<name>``, ``status``), no MLflow calls.

Values are paired by ``train.seed``: a check compares, seed by seed, the final metric of setting ``a`` with
that of ``b`` (or with the random-init encoder of that seed, or a number); seeds missing on either side are
left out of the pairs and the count says so. A claim with ``all_runs_finish`` also decides whether every run
(each trial and each random-init detection run) reached its last iteration without a NaN/inf loss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd

from mocolab.analysis.tables import finished
from mocolab.analysis.verdict import Interval, combine, decide, interval_sd, paired_interval, seeds_needed, threshold
from mocolab.moco.mechanisms import NEGATIVES_PARAM
from mocolab.reproduce.claims import BASELINE_METRICS, RANDOM_INIT, Check, Claim, Setting, matches
from mocolab.tracking import NONFINITE_LOSS_TAG
from mocolab.tune.spec import SEED_KEY

LOSS_TO_CHANCE = "loss_to_chance"
CURVE_METRICS = {"loss_max_rise": ("loss", 1.0), "knn_max_drop": ("knn_top1", -1.0)}
"""Metrics of a run's curve (``name -> (logged metric, sign)``): the largest rise of the training loss from one
epoch to the next (a spike; <= 0 when it only fell) and the largest drop of the kNN monitor between two of its
evaluations (a dip; <= 0 when it only rose)."""


def setting_label(setting: Setting) -> str:
    """``moco.momentum=0.9, moco.queue_size=1024``: how a setting is named in tables, plots and checks."""
    return ", ".join(f"{key}={value}" for key, value in setting.items())


def settings_of_runs(runs: pd.DataFrame, claim: Claim) -> pd.Series:
    """The label of the grid setting each run has (indexed by ``run_id``; runs of no grid setting left out)."""
    labels = {}
    grid = claim.grid()
    for _, row in runs.iterrows():
        for setting in grid:
            if matches(claim.resolve(setting), _trial_setting(row, list(setting))):
                labels[row["run_id"]] = setting_label(setting)
                break
    return pd.Series(labels, dtype=object)


def final_metric(runs: pd.DataFrame, metric: str) -> pd.Series:
    """The final value of ``metric`` per run (``loss_to_chance``: final loss / ln(1 + negatives), the negatives per
    query each run logged from its mechanism; NaN for a run that logged none)."""
    if metric == LOSS_TO_CHANCE:
        column = f"params.{NEGATIVES_PARAM}"
        negatives = pd.to_numeric(runs[column]) if column in runs else pd.Series(float("nan"), index=runs.index)
        return pd.to_numeric(runs["metrics.loss"]) / (1 + negatives).map(math.log)
    column = f"metrics.{metric}"
    return pd.to_numeric(runs[column]) if column in runs else pd.Series(float("nan"), index=runs.index)


def with_curves(runs: pd.DataFrame, histories: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """``runs`` with a ``metrics.<name>`` column for each :data:`CURVE_METRICS` entry, from ``histories``
    (logged metric -> ``metric_history`` frame: run_id, step, value); NaN for a run with fewer than two values."""
    runs = runs.copy()
    for name, (logged, sign) in CURVE_METRICS.items():
        history = histories.get(logged)
        if history is None or history.empty:
            runs[f"metrics.{name}"] = float("nan")
            continue
        steps = history.sort_values(["run_id", "step"]).groupby("run_id")["value"]
        largest = steps.apply(lambda values: (sign * values.diff()).max())
        runs[f"metrics.{name}"] = runs["run_id"].map(largest).astype(float)
    return runs


def _trial_setting(row: pd.Series, keys: list[str]) -> Setting:
    return {key: row.get(f"params.{key}") for key in keys}


def by_seed(runs: pd.DataFrame, setting: Setting, metric: str) -> pd.Series:
    """``metric`` of the finished runs of ``setting`` (values as logged: named values resolved), indexed by seed
    (NaN values dropped)."""
    done = finished(runs)
    if done.empty:
        return pd.Series(dtype=float)
    keys = list(setting)
    chosen = done[done.apply(lambda row: matches(setting, _trial_setting(row, keys)), axis=1)]
    values = final_metric(chosen, metric) if not chosen.empty else pd.Series(dtype=float)
    seeds = pd.to_numeric(chosen.get(f"params.{SEED_KEY}", pd.Series(dtype=float))).astype("Int64")
    return pd.Series(values.to_numpy(), index=seeds.to_numpy(), dtype=float).dropna().sort_index()


@dataclass(frozen=True)
class CheckResult:
    """A check's paired values, interval and verdict."""

    check: Check
    metric: str
    a: pd.Series  # by seed
    b: pd.Series | float
    interval: Interval | None
    verdict: str

    @property
    def seeds_needed(self) -> int | None:
        """Seeds that resolve this check with 80 % power at its observed spread, if the true difference is the
        check's ``effect`` (else the observed mean difference); None when no affordable number does (or no
        interval)."""
        iv = self.interval
        if iv is None or not iv.defined:
            return None
        effect = self.check.effect if self.check.effect is not None else iv.mean
        distance = abs(effect - threshold(self.check.relation, self.check.margin, effect))
        return seeds_needed(interval_sd(iv), distance)

    @property
    def text(self) -> str:
        """``a RELATION b`` in words, with the margin."""
        b = self.check.b
        right = setting_label(b) if isinstance(b, dict) else ("random init" if b == RANDOM_INIT else f"{b:g}")
        margin = f" (margin {self.check.margin:g})" if self.check.margin else ""
        return f"{setting_label(self.check.a)} {self.check.relation} {right}{margin}"


def evaluate_check(claim: Claim, check: Check, runs: pd.DataFrame, baselines: pd.DataFrame) -> CheckResult:
    """Pair the check's two sides by seed and decide it; ``baselines``: the random-init encoder's metrics (columns)
    by seed (index)."""
    metric = claim.metric_of(check)
    a = by_seed(runs, claim.resolve(check.a), metric)
    if isinstance(check.b, dict):
        b: pd.Series | float = by_seed(runs, claim.resolve(check.b), metric)
    elif check.b == RANDOM_INIT:
        b = baseline_of(baselines, metric)
    else:
        b = float(check.b)
    if isinstance(b, pd.Series):
        seeds = a.index.intersection(b.index)
        a, b = a.loc[seeds], b.loc[seeds]
    if a.empty:
        return CheckResult(check, metric, a, b, None, "inconclusive")
    interval = paired_interval(a.to_numpy(), b.to_numpy() if isinstance(b, pd.Series) else b)
    return CheckResult(check, metric, a, b, interval, decide(interval, check.relation, check.margin))


def baseline_of(baselines: pd.DataFrame, metric: str) -> pd.Series:
    """The random-init values of ``metric`` by seed (empty when it was not measured)."""
    if metric not in baselines:
        return pd.Series(dtype=float)
    return pd.to_numeric(baselines[metric]).dropna().sort_index()


@dataclass(frozen=True)
class FinishResult:
    """The ``all_runs_finish`` check: ``outcomes`` maps every run's name to None (it finished) or what stopped it;
    reproduced when every run finished, not reproduced when any did not, inconclusive when there were none."""

    outcomes: Mapping[str, str | None]

    name = "every run reaches its last iteration with a finite loss"
    metric = "finished"
    interval = None

    @property
    def failures(self) -> dict[str, str]:
        return {run: why for run, why in self.outcomes.items() if why is not None}

    @property
    def verdict(self) -> str:
        if not self.outcomes:
            return "inconclusive"
        return "not_reproduced" if self.failures else "reproduced"

    @property
    def text(self) -> str:
        """``6 of 6 runs finished`` and, per run that did not, its name and what stopped it."""
        done = len(self.outcomes) - len(self.failures)
        stopped = "".join(f"; {run}: {why}" for run, why in self.failures.items())
        return f"{done} of {len(self.outcomes)} runs finished{stopped}"


def trial_outcomes(runs: pd.DataFrame, reasons: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """Each trial run's name -> None when it FINISHED without a NaN/inf loss, else why not: ``reasons`` (by
    ``run_id``, e.g. an evaluation's NaN), else its ``mocolab.nonfinite_loss`` tag, else its status."""
    reasons = reasons or {}
    outcomes = {}
    for _, row in runs.iterrows():
        name = row.get("tags.mlflow.runName") or row["run_id"]
        nonfinite = row.get(f"tags.{NONFINITE_LOSS_TAG}")
        nonfinite = nonfinite if isinstance(nonfinite, str) and nonfinite else None
        if row.get("status") == "FINISHED" and nonfinite is None:
            outcomes[name] = None
        else:
            outcomes[name] = reasons.get(row["run_id"]) or nonfinite or f"status {row.get('status')}"
    return outcomes


def evaluate_claim(
    claim: Claim,
    runs: pd.DataFrame,
    baselines: pd.DataFrame,
    baseline_outcomes: Mapping[str, str | None] | None = None,
    reasons: Mapping[str, str] | None = None,
) -> tuple[str, list[CheckResult | FinishResult]]:
    """Every check's result and the claim's verdict from its ``role: claim`` checks (all reproduced / any not
    reproduced / else inconclusive); diagnostics are decided but do not count. With ``all_runs_finish`` the
    :class:`FinishResult` comes last and counts: over the trials (``runs``; ``reasons``: why a trial failed, by
    ``run_id``, see :func:`trial_outcomes`) and the random-init runs (``baseline_outcomes``: name -> None or why)."""
    checks = [evaluate_check(claim, check, runs, baselines) for check in claim.checks]
    verdicts = [r.verdict for r in checks if r.check.role == "claim"]
    results: list[CheckResult | FinishResult] = list(checks)
    if claim.all_runs_finish:
        results.append(FinishResult({**trial_outcomes(runs, reasons), **(baseline_outcomes or {})}))
        verdicts.append(results[-1].verdict)
    return combine(verdicts), results


def rows_table(
    claim: Claim, runs: pd.DataFrame, metrics: tuple[str, ...] = (*BASELINE_METRICS, "loss")
) -> pd.DataFrame:
    """One row per grid setting: ``setting``, the paper's value, and ``n``, ``<metric>_mean``, ``<metric>_std``
    over seeds for each metric (the final epoch's value; NaN for a metric the runs did not log)."""
    rows = []
    for setting in claim.grid():
        paper = next((r.value for r in claim.paper.rows if matches(r.setting, setting)), None)
        row: dict = {"setting": setting_label(setting), "paper": paper}
        for metric in metrics:
            values = by_seed(runs, claim.resolve(setting), metric)
            row["n"] = max(row.get("n", 0), len(values))
            row[f"{metric}_mean"] = values.mean() if len(values) else float("nan")
            row[f"{metric}_std"] = values.std() if len(values) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)
