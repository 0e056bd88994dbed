"""``mocolab detect CONFIG (--pretrain-run ID | --weights PATH | --init random|supervised)``."""

from __future__ import annotations

import argparse
from typing import Any

from mocolab.config import Config, load_config
from mocolab.evaluate.detection import detection_train_loop
from mocolab.evaluate.runner import eval_params, run_eval
from mocolab.evaluate.weights import BackboneSource, add_source_arguments, resolve_source
from mocolab.tracking import DETECTION_METRICS


def run_detection(cfg: Config, source: BackboneSource) -> dict[str, Any]:
    """Fine-tune a Faster R-CNN on ``source``'s backbone per ``cfg.eval.detection`` on Ray Train workers,
    filed in MLflow. Returns ``det_AP``, ``det_AP50``, ``det_AP75`` (percent), timings and ``run_id``.
    The caller has run the pre-flight step (which also reads, or makes, the detection data)."""
    det = cfg.eval.detection
    return run_eval(
        cfg,
        source,
        "detection",
        eval_params(cfg, "detection", det, source),
        detection_train_loop,
        {"config": cfg.model_dump(mode="json")},
        det.num_workers,
        DETECTION_METRICS,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from mocolab.preflight import preflight

    cfg = load_config(args.config, args.overrides)
    source = resolve_source(cfg, args.pretrain_run, args.weights, args.init)
    preflight(cfg, ("detection",), source=source)
    metrics = run_detection(cfg, source)
    print(
        f"[mocolab detect] {source.label}: AP {metrics['det_AP']:.2f}  AP50 {metrics['det_AP50']:.2f}  "
        f"AP75 {metrics['det_AP75']:.2f}  (percent; train {metrics['det_train_s']:.0f} s, MLflow run {metrics['run_id']})"
    )
    return 0
