"""An ablation summary of a set of runs: which parameters were swept, the table, the best trial,
and its markdown; pure pandas on a runs frame, shared by ``mocolab report`` and the notebooks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from mocolab.analysis import tables
from mocolab.analysis.tables import MECHANISM, K
from mocolab.tracking.names import DEVICE_HOURS, HEADLINE_METRICS


@dataclass
class Summary:
    """What a report shows about a set of runs."""

    title: str
    runs: pd.DataFrame  # the FINISHED runs
    axes: list[str]  # the parameters the table is grouped by
    metrics: list[str]
    table: pd.DataFrame  # numbers: axes, n, <metric>_mean, <metric>_std
    display: pd.DataFrame  # the same as "mean ± std" strings
    best: pd.Series | None  # the run with the highest primary metric
    failed: int  # runs that did not finish

    @property
    def primary(self) -> str | None:
        return self.metrics[0] if self.metrics else None

    @property
    def is_mechanism_comparison(self) -> bool:
        return self.axes == [MECHANISM, K]

    def mechanism_grid(self) -> pd.DataFrame:
        """Rows K, one column per mechanism: the paper's Figure 3 as a table."""
        grid = tables.pivot_by(self.table, K, MECHANISM, self.primary)
        grid.index.name = "K"
        return grid


def table_axes(axes: Sequence[str]) -> list[str]:
    """The grouping keys: a mechanism comparison groups by mechanism and the effective K each run logged, not
    by the queue size and batch size that make up K."""
    axes = list(axes)
    if MECHANISM in axes:
        return [MECHANISM, K]
    return axes


def summarize(
    runs: pd.DataFrame, title: str, axes: Sequence[str] | None = None, metrics: Sequence[str] | None = None
) -> Summary:
    """Summarize ``runs`` (an ``mlflow.search_runs`` frame) grouped by ``axes`` (default: the params that
    differ between runs). ValueError when no run finished or none has the metrics."""
    done = tables.finished(runs)
    if done.empty:
        raise ValueError(f"{title}: none of the {len(runs)} run(s) finished; nothing to tabulate")
    axes = list(axes) if axes else tables.varying_params(done)
    by = table_axes(axes) or ["train.seed"]
    chosen = tables.available_metrics(done, metrics)
    if not chosen:
        wanted = list(metrics) if metrics else list(HEADLINE_METRICS)
        raise ValueError(f"{title}: no finished run has any of the metrics {wanted}")
    table = tables.ablation_table(done, by, chosen)
    best = tables.best_trial(done, chosen[0])
    return Summary(
        title=title,
        runs=done,
        axes=by,
        metrics=chosen,
        table=table,
        display=tables.formatted(table, by, chosen),
        best=best,
        failed=len(runs) - len(done),
    )


def run_label(run: pd.Series, axes: Sequence[str]) -> str:
    """``moco.momentum=0.99 seed=0``: how a run appears in legends."""
    parts = [f"{key}={run.get(tables.param_col(key))}" for key in axes]
    seed = run.get(tables.param_col("train.seed"))
    if seed is not None:
        parts.append(f"seed={seed}")
    return " ".join(parts)


def compute_points(summary: Summary) -> pd.DataFrame:
    """One row per finished run that logged its device-hours and the primary metric: ``device_hours``, the metric,
    and the run's ``label`` (its values of the summary's axes: the seeds of a setting share a label)."""
    runs, metric = summary.runs, summary.primary
    columns = [DEVICE_HOURS, metric, "label"]
    if tables.metric_col(DEVICE_HOURS) not in runs or tables.metric_col(metric) not in runs:
        return pd.DataFrame(columns=columns)
    axes = [a for a in summary.axes if a != K]
    points = pd.DataFrame(
        {
            DEVICE_HOURS: pd.to_numeric(runs[tables.metric_col(DEVICE_HOURS)]),
            metric: pd.to_numeric(runs[tables.metric_col(metric)]),
            "label": [
                " ".join(f"{a}={run.get(tables.param_col(a))}" for a in axes) or "runs" for _, run in runs.iterrows()
            ],
        }
    )
    return points.dropna(subset=[DEVICE_HOURS, metric]).reset_index(drop=True)


def comparison(runs: pd.DataFrame, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Runs side by side: name, status, the params that differ between them, the metrics they have."""
    keys = tables.varying_params(runs, exclude=("tracking.", "scaling.storage_path"))
    out = pd.DataFrame({"run": runs.get("tags.mlflow.runName", runs["run_id"]), "status": runs["status"]})
    for key in keys:
        out[key] = runs[tables.param_col(key)]
    for m in tables.available_metrics(runs, metrics):
        out[m] = pd.to_numeric(runs[tables.metric_col(m)]).round(2)
    return out.reset_index(drop=True)


def markdown(summary: Summary, images: Sequence[str] = ()) -> str:
    """The report as markdown: table (mean ± std over seeds), best trial, plots."""
    lines = [f"# {summary.title}", ""]
    lines.append(
        f"{len(summary.runs)} finished run(s)"
        + (f", {summary.failed} not finished (failed, killed or running)" if summary.failed else "")
        + f"; mean ± std over runs with the same {', '.join(summary.axes)}."
    )
    lines += ["", tables.to_markdown(summary.display), ""]
    if summary.is_mechanism_comparison:
        lines += [f"## {summary.primary} against K, one column per mechanism", ""]
        lines += [tables.to_markdown(summary.mechanism_grid(), index=True), ""]
    if summary.best is not None:
        best = summary.best
        name = best.get("tags.mlflow.runName", best["run_id"])
        value = best[tables.metric_col(summary.primary)]
        lines += [
            "## Best run",
            "",
            f"`{name}` (MLflow run `{best['run_id']}`): {summary.primary} = {value:.2f}, "
            f"{run_label(best, [a for a in summary.axes if a != K])}",
            "",
        ]
    for image in images:
        lines += [f"![{image}]({image})", ""]
    return "\n".join(lines)
