"""Ablation tables from a runs frame (``mlflow.search_runs`` columns): pure pandas, no MLflow calls.

A table has one row per value (or combination) of the swept parameters and, for each metric,
``<metric>_mean``, ``<metric>_std`` (over seeds / repeats) and ``n`` runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from mocolab.moco.mechanisms import EFFECTIVE_K_PARAM, NEGATIVES_PARAM
from mocolab.tracking.names import HEADLINE_METRICS

# Params that differ between trials without being an ablation axis (the mechanism's params follow the axes).
NOT_AXES = ("train.seed", "tracking.", "scaling.storage_path", EFFECTIVE_K_PARAM, NEGATIVES_PARAM)
MECHANISM = "moco.mechanism"
K = EFFECTIVE_K_PARAM  # the dictionary size each pretraining run logs (see moco/mechanisms)


def param_col(key: str) -> str:
    return f"params.{key}"


def metric_col(name: str) -> str:
    return f"metrics.{name}"


def finished(runs: pd.DataFrame) -> pd.DataFrame:
    """Only the runs whose status is FINISHED."""
    return runs[runs["status"] == "FINISHED"] if "status" in runs else runs


def available_metrics(runs: pd.DataFrame, wanted: Sequence[str] | None = None) -> list[str]:
    """The metrics of ``wanted`` (default: the headline ones) that at least one run has."""
    names = list(wanted) if wanted else list(HEADLINE_METRICS)
    return [m for m in names if metric_col(m) in runs and runs[metric_col(m)].notna().any()]


def varying_params(runs: pd.DataFrame, exclude: Sequence[str] = NOT_AXES) -> list[str]:
    """Dotted params whose value differs between runs, but for those starting with one of ``exclude``
    (default: seeds, tracking and storage, which differ without being ablation axes); sorted."""
    keys = []
    for col in runs.columns:
        if not col.startswith("params."):
            continue
        key = col[len("params.") :]
        if not key.startswith(tuple(exclude)) and runs[col].astype(str).nunique(dropna=False) > 1:
            keys.append(key)
    return sorted(keys)


def _as_number(value: object) -> object:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return value


def typed_params(runs: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """The params ``keys`` as columns named by their dotted key, numbers parsed where every value is one."""
    out = pd.DataFrame(index=runs.index)
    for key in keys:
        values = runs[param_col(key)] if param_col(key) in runs else runs[key]
        parsed = values.map(_as_number)
        numeric = parsed.map(lambda v: isinstance(v, float)).all()
        out[key] = parsed.astype(float) if numeric else values.astype(str)
    return out


def ablation_table(runs: pd.DataFrame, by: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """One row per value of the ``by`` params: ``n`` runs and ``<metric>_mean`` / ``<metric>_std``.

    The std is the sample std over the runs of the row (NaN for a single run); rows are sorted by the
    params, numerically where they are numbers."""
    if not by:
        raise ValueError("ablation_table needs at least one parameter to group by")
    frame = typed_params(runs, by)
    for m in metrics:
        frame[m] = pd.to_numeric(runs[metric_col(m)], errors="coerce")
    grouped = frame.groupby(list(by), sort=True, dropna=False)
    table = grouped.size().rename("n").to_frame()
    for m in metrics:
        table[f"{m}_mean"] = grouped[m].mean()
        table[f"{m}_std"] = grouped[m].std()
    return table.reset_index()


def best_trial(runs: pd.DataFrame, metric: str) -> pd.Series:
    """The run with the highest ``metric``; ValueError if no run has it."""
    col = metric_col(metric)
    if col not in runs or runs[col].notna().sum() == 0:
        raise ValueError(f"no run has metric '{metric}'")
    return runs.loc[pd.to_numeric(runs[col]).idxmax()]


def mean_std(mean: float, std: float, digits: int = 1) -> str:
    """``"58.8 ± 0.4"``; just the mean for a single run, ``"-"`` when missing."""
    if pd.isna(mean):
        return "-"
    return f"{mean:.{digits}f}" if pd.isna(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _format_param(value: object) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1:
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def formatted(table: pd.DataFrame, by: Sequence[str], metrics: Sequence[str], digits: int = 1) -> pd.DataFrame:
    """The paper's layout: the params, then one ``mean ± std`` column per metric, then ``n``."""
    out = pd.DataFrame({key: table[key].map(_format_param) for key in by})
    for m in metrics:
        out[m] = [mean_std(a, b, digits) for a, b in zip(table[f"{m}_mean"], table[f"{m}_std"])]
    out["n"] = table["n"].astype(int)
    return out


def pivot_by(table: pd.DataFrame, row: str, column: str, metric: str, digits: int = 1) -> pd.DataFrame:
    """A 2-D layout (e.g. rows K, columns mechanism) of ``mean ± std`` of ``metric``."""
    cells = table.assign(cell=[mean_std(a, b, digits) for a, b in zip(table[f"{metric}_mean"], table[f"{metric}_std"])])
    out = cells.pivot(index=row, columns=column, values="cell").fillna("-")
    out.index = [_format_param(v) for v in out.index]
    out.index.name, out.columns.name = row, None
    return out


def to_markdown(frame: pd.DataFrame, index: bool = False) -> str:
    """A GitHub markdown table of ``frame`` (no extra dependency)."""
    frame = frame.reset_index() if index else frame
    header = [str(c) for c in frame.columns]
    rows = [[str(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
