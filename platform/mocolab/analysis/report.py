"""The report of a sweep or an experiment (``mocolab report``): ablation table, plots and a markdown report.

Reads the runs from MLflow, prints the table (mean ± std over seeds), writes ``report.md``,
``ablation.csv`` and PNG plots to the report folder (default ``reports/<name>/``) and logs them to the
sweep's parent run under ``report/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mocolab.analysis import plots, runs
from mocolab.analysis import summary as summ
from mocolab.analysis.tables import K
from mocolab.config import ConfigError
from mocolab.tracking.masking import redact
from mocolab.tracking.names import REPORT_ARTIFACT_DIR
from mocolab.tracking.store import check_reachable


def write_plots(s: summ.Summary, uri: str, out: Path) -> list[Path]:
    """The summary's PNGs: the ablation curve (one swept parameter) or accuracy vs K (mechanisms), the
    learning curves of the primary metric where it has a per-epoch history, and the primary metric against
    each run's device-hours where the runs logged them."""
    written = []
    if s.is_mechanism_comparison:
        written.append(plots.plot_accuracy_vs_k(s.table, s.primary, out / "accuracy_vs_k.png"))
    elif len(s.axes) == 1:
        for metric in s.metrics:
            written.append(plots.plot_ablation(s.table, s.axes[0], metric, out / f"ablation_{metric}.png"))
    history = runs.metric_history(uri, list(s.runs["run_id"]), s.primary)
    if history["step"].nunique() > 1:
        labels = {r["run_id"]: summ.run_label(r, [a for a in s.axes if a != K]) for _, r in s.runs.iterrows()}
        written.append(plots.plot_learning_curves(history, labels, s.primary, out / "learning_curves.png"))
    points = summ.compute_points(s)
    if not points.empty:
        written.append(plots.plot_accuracy_vs_device_hours(points, s.primary, out / "accuracy_vs_device_hours.png"))
    return written


def make_report(
    uri: str,
    sweep: str | None = None,
    experiment: str | None = None,
    out: Path | None = None,
    metrics: Sequence[str] = (),
    log_to_parent: bool = True,
) -> tuple[summ.Summary, Path]:
    """Build and write the report of a sweep (or of an experiment's pretraining runs).

    Returns ``(summary, report folder)``. The store's reachability and ``out`` (not a file) are checked first."""
    if (sweep is None) == (experiment is None):
        raise ConfigError("give a sweep name or --experiment NAME (one of them)")
    out = Path(out) if out is not None else Path("reports") / (sweep or experiment)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for report.md, ablation.csv and the plots")
    check_reachable(uri)
    parent = None
    if sweep is not None:
        parent, frame = runs.load_sweep_runs(uri, sweep)
        title, axes = f"Sweep {sweep}", runs.sweep_axes(parent)
    else:
        frame = runs.load_experiment_runs(uri, experiment)
        title, axes = f"Experiment {experiment}", None
    if frame.empty:
        raise ConfigError(f"{title}: no pretraining runs in {redact(uri)}")
    try:
        s = summ.summarize(frame, title, axes=axes, metrics=metrics or None)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    out.mkdir(parents=True, exist_ok=True)
    images = write_plots(s, uri, out)
    s.table.to_csv(out / "ablation.csv", index=False)
    (out / "report.md").write_text(summ.markdown(s, [p.name for p in images]))
    if parent is not None and log_to_parent:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        for path in [out / "report.md", out / "ablation.csv", *images]:
            client.log_artifact(parent["run_id"], str(path), REPORT_ARTIFACT_DIR)
    return s, out


def terminal_text(s: summ.Summary) -> str:
    """The table as plain text, plus the mechanism grid and the best run."""
    parts = [s.title, s.display.to_string(index=False)]
    if s.is_mechanism_comparison:
        parts += [f"{s.primary} against K:", s.mechanism_grid().to_string()]
    if s.best is not None:
        label = summ.run_label(s.best, [a for a in s.axes if a != K])
        parts.append(
            f"best: {s.best.get('tags.mlflow.runName')} {s.primary}={s.best[f'metrics.{s.primary}']:.2f} ({label})"
        )
    if s.failed:
        parts.append(f"{s.failed} run(s) did not finish and are left out")
    return "\n".join(parts)
