"""The benchmark's results: the JSON record (fixed keys, fractions as fractions) and the printed table.

Plain Python only, so that the torch-only GPU check can print the same table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mocolab.bench.spread import NOISE_TOLERANCE, Spread

# Every key of the JSON record; a part of the benchmark that did not run leaves its keys null.
RESULT_KEYS = (
    "step_img_s",  # mocolab's training step, images/s of one worker (median over repetitions)
    "reference_img_s",  # the plain reference loop, same sizes, same process
    "ratio_vs_reference",  # step / reference, per repetition
    "data_img_s_per_worker",  # decode + two-crop augment + collate, one loader worker process
    "data_vs_step",  # data pipeline / step, per repetition
    "epoch_img_s",  # a real `mocolab pretrain` epoch (all workers, whole epochs), median over rounds
    "launcher_img_s",  # the same config trained the official launcher's way (spawn + DDP, no Ray, no MLflow)
    "epoch_ratio_vs_launcher",  # mocolab epoch / launcher epoch, per round
    "loop_ratio_vs_launcher",  # the same for the training loops alone
    "between_epochs_s",  # mocolab: seconds per epoch outside its training loop (report, logging, checkpoints)
    "launcher_between_epochs_s",  # the launcher: the same
    "knn_s",  # one kNN monitor evaluation on all workers (bank and test shards, bank all-gathered)
    "knn_vs_epoch",  # knn_s / launcher epoch: what a monitor every epoch adds, per round
    "startup_s",  # command start to first step
    "checkpoint_save_s",
    "checkpoint_load_s",
    "checkpoint_mb",
    "momentum_queue_fraction",  # momentum update + queue update, fraction of the step
    "profile",  # {phase: fraction of the step}
    "shuffle",  # shuffle-BN per worker per step, one row per worker count: SHUFFLE_COLUMNS (bench/shuffle.py)
)
SPREAD_KEYS = (
    "ratio_vs_reference",
    "data_vs_step",
    "epoch_ratio_vs_launcher",
    "loop_ratio_vs_launcher",
    "knn_vs_epoch",
)
"""Ratios measured in repetitions: the record holds their median, and ``record["spread"][key]`` min / median / max."""

# The columns of a "shuffle" row: bytes received (analytic) and seconds of shuffle + unshuffle (measured) of the
# all-gather and the all-to-all shuffle; ratios are all-to-all / gather.
SHUFFLE_COLUMNS = (
    "workers",
    "gather_bytes",
    "all_to_all_bytes",
    "bytes_ratio",
    "gather_s",
    "all_to_all_s",
    "time_ratio",
)
SHUFFLE_TITLE = (
    "shuffle-BN per worker per step: bytes received (analytic, expected) and seconds of shuffle + "
    "unshuffle (measured, gloo processes on this machine)"
)

# Targets of the performance issue: key -> (comparison, bound, note).
TARGETS = {
    "ratio_vs_reference": (">=", 1.0, "CPU fp32"),
    "epoch_ratio_vs_launcher": (">=", 0.95, "quickstart and CIFAR-subset configs, 2 CPUs"),
    "data_vs_step": (">=", 2.0, "CIFAR config"),
    "momentum_queue_fraction": ("<=", 0.03, "ResNet-50 at 224"),
}


def empty_result() -> dict[str, Any]:
    return {**dict.fromkeys(RESULT_KEYS), "spread": {}}


def set_spread(result: dict[str, Any], key: str, spread: Spread) -> None:
    """Record a repeated ratio: its median under ``key``, min / median / max under ``spread``."""
    result[key] = spread.median
    result["spread"][key] = spread.as_dict()


def noisy_keys(result: dict[str, Any]) -> list[str]:
    """The recorded ratios whose repetitions disagree by more than NOISE_TOLERANCE."""
    return [key for key, record in result["spread"].items() if Spread.from_dict(record).noisy]


def format_value(value: Any) -> str:
    """A number as the tables show it: thousands separators from 100 up, 3 significant digits below 1."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isfinite(value) and abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def target_status(key: str, value: float | None, spread: Spread | None = None) -> str:
    """``">= 0.95 (note) ok"`` / ``"... MISS"`` for a key with a target, ``""`` otherwise; with a ``spread`` wider
    than NOISE_TOLERANCE, ``"... too noisy for a verdict"`` instead of ok or MISS."""
    if key not in TARGETS or value is None:
        return ""
    op, bound, note = TARGETS[key]
    if spread is not None and spread.noisy:
        return f"{op} {bound:g} ({note}) too noisy for a verdict"
    met = value >= bound if op == ">=" else value <= bound
    return f"{op} {bound:g} ({note}) {'ok' if met else 'MISS'}"


def format_spread(spread: Spread) -> str:
    """``"0.970 [0.950, 0.990] x3 +-2.1%"``: median, min and max, repetitions, largest distance from the median."""
    return f"{spread.median:.3f} [{spread.min:.3f}, {spread.max:.3f}] x{spread.repeats} +-{100 * spread.relative:.1f}%"


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A plain-text table with aligned columns."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def result_table(result: dict[str, Any]) -> str:
    """The tables ``mocolab bench`` prints: one row per measured key (ratios with their spread), profile phases
    indented, a closing line naming the ratios too noisy for a verdict; then, if measured, the shuffle-BN table
    (one row per worker count). Tables with no rows are left out."""
    rows = []
    for key in RESULT_KEYS:
        value = result.get(key)
        spread = Spread.from_dict(result["spread"][key]) if key in result["spread"] else None
        if key == "profile":
            for phase, fraction in (value or {}).items():
                rows.append([f"  profile.{phase}", format_value(fraction), ""])
        elif key != "shuffle" and value is not None:
            shown = format_spread(spread) if spread is not None else format_value(value)
            rows.append([key, shown, target_status(key, value, spread)])
    tables = []
    if rows:
        table = format_table(rows, ["metric", "value [min, max] xrepeats", "target"])
        noisy = noisy_keys(result)
        if noisy:
            table += (
                f"\nthe machine is too noisy for a verdict on {', '.join(noisy)}: their repetitions differ by "
                f"more than +-{100 * NOISE_TOLERANCE:g}% from the median; rerun on a quiet machine or with more "
                "repeats"
            )
        tables.append(table)
    if result.get("shuffle"):
        shuffle_rows = [[format_value(_as_float(row[c])) for c in SHUFFLE_COLUMNS] for row in result["shuffle"]]
        tables.append(f"{SHUFFLE_TITLE}\n{format_table(shuffle_rows, SHUFFLE_COLUMNS)}")
    return "\n\n".join(tables)


def _as_float(value: Any) -> Any:
    """Counts of bytes print with thousands separators, as floats do (worker counts stay as they are)."""
    return float(value) if isinstance(value, int) and value >= 100 else value


def metrics_for_mlflow(result: dict[str, Any]) -> dict[str, float]:
    """The numeric results as flat MLflow metrics (``<ratio>_min`` / ``<ratio>_max`` for the spreads,
    ``profile_<phase>`` for the breakdown, ``shuffle_<column>_w<workers>`` for the shuffle-BN rows)."""
    metrics = {k: float(v) for k, v in result.items() if k in RESULT_KEYS and isinstance(v, (int, float))}
    for key, record in result["spread"].items():
        metrics.update({f"{key}_min": float(record["min"]), f"{key}_max": float(record["max"])})
    metrics.update({f"profile_{phase}": float(v) for phase, v in (result.get("profile") or {}).items()})
    for row in result.get("shuffle") or []:
        metrics.update(
            {
                f"shuffle_{column}_w{row['workers']}": float(row[column])
                for column in SHUFFLE_COLUMNS[1:]
                if row[column] is not None
            }
        )
    return metrics


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
