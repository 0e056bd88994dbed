"""``mocolab lincls CONFIG (--pretrain-run ID | --weights PATH | --init random|supervised) [--fast]``."""

from __future__ import annotations

import argparse
from typing import Any

from mocolab.config import Config, LinclsConfig, flatten, load_config, resolve_lincls
from mocolab.evaluate.lincls import dataset_config, lincls_train_loop, metric_names
from mocolab.evaluate.runner import eval_params, run_eval
from mocolab.evaluate.weights import BackboneSource, add_source_arguments, resolve_source


def with_lincls(cfg: Config, arch: str | None = None) -> Config:
    """``cfg`` with an ``eval.lincls`` section (the paper's protocol by default), resolved for the backbone ``arch``
    when given (``config.resolve_lincls``: the v3 protocol for a timm ViT)."""
    lin = cfg.eval.lincls or LinclsConfig()
    if arch is not None:
        lin = resolve_lincls(lin, arch)
    return cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"lincls": lin})})


def run_lincls(cfg: Config, source: BackboneSource) -> dict[str, Any]:
    """Linear evaluation of ``source``'s backbone per ``cfg.eval.lincls`` (defaults: the paper's) on
    Ray Train workers, filed in MLflow. Returns the metrics (``lincls_top1``/``_top5`` in percent, or
    ``lincls_fast_*``) and ``run_id``. The caller has run the pre-flight step. The params show the protocol's
    resolved values."""
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    parser.add_argument("--fast", action="store_true", help="train on features extracted once (eval.lincls.fast)")


def main(args: argparse.Namespace) -> int:
    from mocolab.preflight import preflight

    overrides = list(args.overrides) + (["eval.lincls.fast=true"] if args.fast else [])
    cfg = with_lincls(load_config(args.config, overrides))
    source = resolve_source(cfg, args.pretrain_run, args.weights, args.init)
    preflight(cfg, ("lincls",), source=source)
    metrics = run_lincls(cfg, source)
    top1, top5 = metric_names(cfg.eval.lincls.fast)
    print(f"[mocolab lincls] {source.label}: top-1 {metrics[top1]:.2f}%  top-5 {metrics[top5]:.2f}%  (MLflow run {metrics['run_id']})")
    return 0
