"""The evaluations: linear classification (:func:`run_lincls`) and detection transfer (:func:`run_detection`) of
a backbone, and those a pretraining config names (``eval.lincls``, ``eval.detection``), for a pretraining run and
for a random-init backbone of the same architecture (the reference rows of every table). The caller has run the
pre-flight step."""

from __future__ import annotations

from typing import Any

from mocolab.config import Config, LinclsConfig, flatten, resolve_lincls
from mocolab.evaluate.detection import detection_train_loop
from mocolab.evaluate.lincls import dataset_config, lincls_train_loop, metric_names
from mocolab.evaluate.runner import eval_params, run_eval
from mocolab.evaluate.weights import BackboneSource, resolve_source
from mocolab.tracking import DETECTION_METRICS, DOWNSTREAM_METRICS

DETECTION_NONFINITE_FIX = (
    "Lower eval.detection.lr, raise eval.detection.warmup_iters or set eval.detection.clip_grad_norm "
    "(and keep eval.detection.bn=sync: frozen BN leaves a random-init backbone unnormalised), then run again."
)


def with_lincls(cfg: Config, arch: str | None = None) -> Config:
    """``cfg`` with an ``eval.lincls`` section (the paper's protocol by default), resolved for the backbone ``arch``
    when given (``config.resolve_lincls``: the v3 protocol for a timm ViT)."""
    lin = cfg.eval.lincls or LinclsConfig(seed=cfg.train.seed)
    if arch is not None:
        lin = resolve_lincls(lin, arch)
    return cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"lincls": lin})})


def run_lincls(cfg: Config, source: BackboneSource) -> dict[str, Any]:
    """Linear evaluation of ``source``'s backbone per ``cfg.eval.lincls`` (defaults: the paper's) on
    Ray Train workers, filed in MLflow. Returns the metrics (``lincls_top1``/``_top5`` in percent, or
    ``lincls_fast_*``) and ``run_id``. The params show the protocol's resolved values."""
    cfg = with_lincls(cfg, source.model.arch)
    lin = cfg.eval.lincls
    params = eval_params(cfg, "lincls", lin, source)
    params.pop("eval.lincls.dataset", None)
    params.update(flatten(dataset_config(cfg).model_dump(mode="json"), "eval.lincls.dataset."))
    return run_eval(
        cfg,
        source,
        "lincls",
        params,
        lincls_train_loop,
        {"config": cfg.model_dump(mode="json")},
        lin.num_workers,
        metric_names(lin.fast),
        "Lower eval.lincls.lr (or check the backbone's weights), then run again.",
    )


def run_detection(cfg: Config, source: BackboneSource) -> dict[str, Any]:
    """Fine-tune a Faster R-CNN on ``source``'s backbone per ``cfg.eval.detection`` on Ray Train workers,
    filed in MLflow. Returns ``det_AP``, ``det_AP50``, ``det_AP75`` (percent), timings and ``run_id``.
    The pre-flight step has also read, or made, the detection data."""
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
        DETECTION_NONFINITE_FIX,
    )


def run_evals(cfg: Config, source: BackboneSource) -> dict[str, dict[str, Any]]:
    """Run the configured evaluations of ``source``'s backbone: ``{"lincls": metrics, "detection": metrics}``
    (only the configured ones)."""
    results: dict[str, dict[str, Any]] = {}
    if cfg.eval.lincls is not None:
        results["lincls"] = run_lincls(cfg, source)
    if cfg.eval.detection is not None:
        results["detection"] = run_detection(cfg, source)
    return results


def run_configured_evals(cfg: Config, pretrain_run_id: str) -> dict[str, dict[str, Any]]:
    """Evaluate a finished pretraining run per ``cfg.eval``; the results are their own MLflow runs and are
    copied onto the pretraining run."""
    return run_evals(cfg, resolve_source(cfg, pretrain_run=pretrain_run_id))


def run_random_baselines(cfg: Config) -> dict[str, dict[str, Any]]:
    """The same evaluations from a random-init backbone of ``cfg.model`` (tag ``mocolab.init=random``)."""
    return run_evals(cfg, resolve_source(cfg, init="random"))


def headline_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The downstream metrics of :func:`run_evals`' results, flat: ``{"lincls_fast_top1": 61.2, ...}``."""
    return {
        name: value
        for stage, metrics in results.items()
        for name, value in metrics.items()
        if name in DOWNSTREAM_METRICS.get(stage, ())
    }
