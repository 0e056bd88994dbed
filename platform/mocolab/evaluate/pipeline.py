"""The evaluations a pretraining config names (``eval.lincls``, ``eval.detection``), for a pretraining
run and for a random-init backbone of the same architecture (the reference rows of every table)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from mocolab.config import Config
from mocolab.evaluate.weights import BackboneSource, resolve_source

QUICKSTART_EVALS = Path(__file__).with_name("quickstart_evals.yaml")  # -> experiments/eval/quickstart.yaml
HEADLINE = {
    "lincls": ("lincls_top1", "lincls_top5", "lincls_fast_top1", "lincls_fast_top5"),
    "detection": ("det_AP", "det_AP50", "det_AP75"),
}


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
    """Evaluate a finished pretraining run per ``cfg.eval`` (called by ``run_pretrain``); the results are
    their own MLflow runs and are copied onto the pretraining run."""
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
        if name in HEADLINE.get(stage, ())
    }


ROW_LABELS = {
    "lincls_top1": "linear top-1 (%)",
    "lincls_top5": "linear top-5 (%)",
    "lincls_fast_top1": "linear top-1, cached features (%)",
    "lincls_fast_top5": "linear top-5, cached features (%)",
    "det_AP": "detection AP (%)",
    "det_AP50": "detection AP50 (%)",
    "det_AP75": "detection AP75 (%)",
}


def with_quickstart_evals(cfg: Config) -> Config:
    """``cfg`` with the quickstart's evaluations (``experiments/eval/quickstart.yaml``) as its ``eval``."""
    from mocolab.config import EvalConfig, read_yaml

    evals = EvalConfig.model_validate(read_yaml(QUICKSTART_EVALS).get("eval") or {})
    return cfg.model_copy(update={"eval": evals})


def quickstart_eval_rows(cfg: Config, pretrain_run_id: str) -> list[tuple[str, Optional[float], Optional[float]]]:
    """``(metric, random init, MoCo)`` rows of the quickstart's table for linear eval and detection.

    When ``cfg`` names evaluations, ``run_pretrain`` already ran them and MoCo's values are read from
    the pretraining run; otherwise the quickstart's evaluations run now. The random-init baselines
    always run here, under the same settings."""
    from mocolab.tracking import client_for

    if cfg.eval.lincls is None and cfg.eval.detection is None:
        cfg = with_quickstart_evals(cfg)
        moco_metrics = headline_metrics(run_configured_evals(cfg, pretrain_run_id))
    else:
        moco_metrics = client_for(cfg.tracking.tracking_uri).get_run(pretrain_run_id).data.metrics
    random_metrics = headline_metrics(run_random_baselines(cfg))
    return [(ROW_LABELS[name], value, moco_metrics.get(name)) for name, value in random_metrics.items()]
