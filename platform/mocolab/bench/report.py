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
)

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
    """The table ``mocolab bench`` prints: one row per measured key, profile phases indented."""
    rows = []
    for key in RESULT_KEYS:
        value = result.get(key)
        if key == "profile":
            for phase, fraction in (value or {}).items():
                rows.append([f"  profile.{phase}", format_value(fraction), ""])
        elif value is not None:
            rows.append([key, format_value(value), target_status(key, value)])
    return format_table(rows, ["metric", "value", "target"])


def metrics_for_mlflow(result: dict[str, Any]) -> dict[str, float]:
    """The numeric results as flat MLflow metrics (``profile_<phase>`` for the breakdown)."""
    metrics = {k: float(v) for k, v in result.items() if k in RESULT_KEYS and isinstance(v, (int, float))}
    metrics.update({f"profile_{phase}": float(v) for phase, v in (result.get("profile") or {}).items()})
    return metrics


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
