"""Matplotlib PNGs (Agg backend, no display): ablation curves, accuracy vs K per mechanism, learning curves,
accuracy vs device-hours."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from mocolab.analysis.tables import MECHANISM, K  # noqa: E402


def save_figure(fig: plt.Figure, path: Path, dpi: int = 120) -> Path:
    """Lay out ``fig``, write it to ``path`` (folders created) and close it; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_ablation(table: pd.DataFrame, param: str, metric: str, path: Path) -> Path:
    """Mean ± std of ``metric`` against the values of ``param``, evenly spaced as in the paper's tables."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    positions = range(len(table))
    ax.errorbar(positions, table[f"{metric}_mean"], yerr=table[f"{metric}_std"].fillna(0), marker="o", capsize=4)
    ax.set_xticks(list(positions), [f"{v:g}" if isinstance(v, float) else str(v) for v in table[param]])
    ax.set_xlabel(param)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_accuracy_vs_k(table: pd.DataFrame, metric: str, path: Path) -> Path:
    """The paper's Figure 3: ``metric`` against K (log scale), one line per ``moco.mechanism``."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for mechanism, rows in table.groupby(MECHANISM, sort=True):
        rows = rows.sort_values(K)
        ax.errorbar(
            rows[K],
            rows[f"{metric}_mean"],
            yerr=rows[f"{metric}_std"].fillna(0),
            marker="o",
            capsize=4,
            label=str(mechanism),
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (negatives)")
    ax.set_ylabel(metric)
    ax.legend(title="mechanism")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_learning_curves(history: pd.DataFrame, labels: dict[str, str], metric: str, path: Path) -> Path:
    """``metric`` per epoch, one line per run (``history`` from ``runs.metric_history``; ``labels``: run id ->
    legend text)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    curves = sorted(history.groupby("run_id", sort=False), key=lambda item: labels.get(item[0], item[0]))
    for run_id, rows in curves:
        ax.plot(rows["step"], rows["value"], marker=".", label=labels.get(run_id, run_id[:8]))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    if len(labels) <= 12:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_accuracy_vs_device_hours(points: pd.DataFrame, metric: str, path: Path) -> Path:
    """``metric`` against the device-hours of each run (``points``: columns ``device_hours``, ``metric``,
    ``label``), one marker per run with its label: what each setting bought for its compute."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rows in points.groupby("label", sort=True):
        ax.scatter(rows["device_hours"], rows[metric], label=str(label))
    ax.set_xlabel("device-hours (pretraining)")
    ax.set_ylabel(metric)
    if points["label"].nunique() <= 12:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
