"""The evaluations a pretraining config names (``eval.lincls``, ``eval.detection``), for a pretraining
run and for a random-init backbone of the same architecture (the reference rows of every table)."""

from __future__ import annotations

from typing import Any, Optional

from mocolab.config import Config
from mocolab.evaluate.weights import BackboneSource, resolve_source
from mocolab.tracking import DOWNSTREAM_METRICS


def run_evals(cfg: Config, source: BackboneSource) -> dict[str, dict[str, Any]]:
    """Run the configured evaluations of ``source``'s backbone: ``{"lincls": metrics, "detection": metrics}``
    (only the configured ones)."""
    results: dict[str, dict[str, Any]] = {}
    if cfg.eval.lincls is not None:
        from mocolab.evaluate.lincls_cli import run_lincls

        results["lincls"] = run_lincls(cfg, source)
    if cfg.eval.detection is not None:
        from mocolab.evaluate.detection_cli import run_detection

        results["detection"] = run_detection(cfg, source)
    return results


def run_configured_evals(cfg: Config, pretrain_run_id: str) -> dict[str, dict[str, Any]]:
    """Evaluate a finished pretraining run per ``cfg.eval``; the results are their own MLflow runs and are
    copied onto the pretraining run."""
    return run_evals(cfg, resolve_source(cfg, pretrain_run=pretrain_run_id))


def run_random_baselines(cfg: Config) -> dict[str, dict[str, Any]]:
    """The same evaluations from a random-init backbone of ``cfg.model`` (tag ``mocolab.init=random``)."""
    return run_evals(cfg, resolve_source(cfg, init="random"))


def headline_metrics(results: dict[str, dict[str, Any]]) -> dict[str, Optional[float]]:
    """The downstream metrics of :func:`run_evals`' results, flat: ``{"lincls_fast_top1": 61.2, ...}``."""
    return {
        name: value
        for stage, metrics in results.items()
        for name, value in metrics.items()
        if name in DOWNSTREAM_METRICS.get(stage, ())
    }
