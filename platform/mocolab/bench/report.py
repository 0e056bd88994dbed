"""The benchmark's results: the JSON record (fixed keys, fractions as fractions) and the printed table.

Plain Python only, so that the torch-only GPU check can print the same table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

# Every key of the JSON record; a part of the benchmark that did not run leaves its keys null.
RESULT_KEYS = (
    "step_img_s",  # mocolab's training step, images/s of one worker
    "reference_img_s",  # the plain reference loop, same sizes, same process
    "ratio_vs_reference",  # step_img_s / reference_img_s
    "data_img_s_per_worker",  # decode + two-crop augment + collate, one loader worker process
    "data_vs_step",  # data_img_s_per_worker / step_img_s
    "epoch_img_s",  # a real pretraining epoch (all workers), last epoch
    "bare_img_s",  # the bare step in as many concurrent processes as workers
    "platform_overhead",  # 1 - epoch_img_s / bare_img_s
    "overhead_excl_data",  # the same against bare step + in-process data loading (loader_workers 0 only)
    "startup_s",  # command start to first step
    "checkpoint_save_s",
    "checkpoint_load_s",
    "checkpoint_mb",
    "momentum_queue_fraction",  # momentum update + queue update, fraction of the step
    "profile",  # {phase: fraction of the step}
    "shuffle",  # shuffle-BN per worker per step, one row per worker count: SHUFFLE_COLUMNS (bench/shuffle.py)
)

# The columns of a "shuffle" row: bytes received (analytic) and seconds of shuffle + unshuffle (measured) of the
# all-gather and the all-to-all shuffle; ratios are all-to-all / gather.
SHUFFLE_COLUMNS = (
    "workers", "gather_bytes", "all_to_all_bytes", "bytes_ratio", "gather_s", "all_to_all_s", "time_ratio"
)
SHUFFLE_TITLE = ("shuffle-BN per worker per step: bytes received (analytic, expected) and seconds of shuffle + "
                 "unshuffle (measured, gloo processes on this machine)")

# Targets of the performance issue: key -> (comparison, bound, note).
TARGETS = {
    "ratio_vs_reference": (">=", 1.0, "CPU fp32"),
    "platform_overhead": ("<=", 0.05, "2 workers on 2 CPUs, small CPU config"),
    "data_vs_step": (">=", 2.0, "CIFAR config"),
    "momentum_queue_fraction": ("<=", 0.03, "ResNet-50 at 224"),
}


def empty_result() -> dict[str, Any]:
    return dict.fromkeys(RESULT_KEYS)


def format_value(value: Any) -> str:
    """A number as the tables show it: thousands separators from 100 up, 3 significant digits below 1."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isfinite(value) and abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def target_status(key: str, value: Optional[float]) -> str:
    """``"<= 0.05 ok"`` / ``">= 1.0 MISS"`` for a key with a target, ``""`` otherwise."""
    if key not in TARGETS or value is None:
        return ""
    op, bound, note = TARGETS[key]
    met = value >= bound if op == ">=" else value <= bound
    return f"{op} {bound:g} ({note}) {'ok' if met else 'MISS'}"


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A plain-text table with aligned columns."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def result_table(result: dict[str, Any]) -> str:
    """The tables ``mocolab bench`` prints: one row per measured key, profile phases indented; then, if measured,
    the shuffle-BN table (one row per worker count). Tables with no rows are left out."""
    rows = []
    for key in RESULT_KEYS:
        value = result.get(key)
        if key == "profile":
            for phase, fraction in (value or {}).items():
                rows.append([f"  profile.{phase}", format_value(fraction), ""])
        elif key != "shuffle" and value is not None:
            rows.append([key, format_value(value), target_status(key, value)])
    tables = [format_table(rows, ["metric", "value", "target"])] if rows else []
    if result.get("shuffle"):
        shuffle_rows = [[format_value(_as_float(row[c])) for c in SHUFFLE_COLUMNS] for row in result["shuffle"]]
        tables.append(f"{SHUFFLE_TITLE}\n{format_table(shuffle_rows, SHUFFLE_COLUMNS)}")
    return "\n\n".join(tables)


def _as_float(value: Any) -> Any:
    """Counts of bytes print with thousands separators, as floats do (worker counts stay as they are)."""
    return float(value) if isinstance(value, int) and value >= 100 else value


def metrics_for_mlflow(result: dict[str, Any]) -> dict[str, float]:
    """The numeric results as flat MLflow metrics (``profile_<phase>`` for the breakdown,
    ``shuffle_<column>_w<workers>`` for the shuffle-BN rows)."""
    metrics = {k: float(v) for k, v in result.items() if k in RESULT_KEYS and isinstance(v, (int, float))}
    metrics.update({f"profile_{phase}": float(v) for phase, v in (result.get("profile") or {}).items()})
    for row in result.get("shuffle") or []:
        metrics.update({f"shuffle_{column}_w{row['workers']}": float(row[column])
                        for column in SHUFFLE_COLUMNS[1:] if row[column] is not None})
    return metrics


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
