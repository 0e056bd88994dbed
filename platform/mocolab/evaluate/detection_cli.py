"""``mocolab detect CONFIG (--pretrain-run ID | --weights PATH | --init random|supervised)``."""

from __future__ import annotations

import argparse
from typing import Any

from mocolab.config import Config, load_config
from mocolab.evaluate.detection import detection_train_loop
from mocolab.evaluate.runner import eval_params, run_eval
from mocolab.evaluate.weights import BackboneSource, add_source_arguments, resolve_source
from mocolab.tracking import DETECTION_METRICS

NONFINITE_FIX = (
    "Lower eval.detection.lr, raise eval.detection.warmup_iters or set eval.detection.clip_grad_norm "
    "(and keep eval.detection.bn=sync: frozen BN leaves a random-init backbone unnormalised), then run again."
)


def run_detection(cfg: Config, source: BackboneSource) -> dict[str, Any]:
    """Fine-tune a Faster R-CNN on ``source``'s backbone per ``cfg.eval.detection`` on Ray Train workers,
    filed in MLflow. Returns ``det_AP``, ``det_AP50``, ``det_AP75`` (percent), timings and ``run_id``.
    The caller has run the pre-flight step (which also reads, or makes, the detection data)."""
    det = cfg.eval.detection
    if det.bn == "frozen" and source.state is None:
        print(
            "[mocolab detect] warning: eval.detection.bn=frozen leaves a random-init backbone without normalisation "
            "(its BN statistics are mean 0, var 1); it is not comparable with pretrained inits. Use "
            "eval.detection.bn=sync, as for every init in the paper.",
            flush=True,
        )
    return run_eval(
        cfg,
        source,
        "detection",
        eval_params(cfg, "detection", det, source),
        detection_train_loop,
        {"config": cfg.model_dump(mode="json")},
        det.num_workers,
        DETECTION_METRICS,
        NONFINITE_FIX,
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
