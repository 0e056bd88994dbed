"""Run one evaluation on Ray Train workers and file it in MLflow (its own run, linked to its pretraining run).

The command that calls it has run the pre-flight step (data, storage, tracking) already.

The evaluation run is tagged ``mocolab.stage`` and ``mocolab.init`` (plus ``mocolab.pretrain_run_id``
for a pretrained backbone), gets its eval section as params, and its headline metrics; those are also
copied onto the pretraining run (``tracking.record_downstream``). A failed fit marks the run FAILED, Ctrl-C
(or SIGTERM) KILLED; a NaN/inf loss marks it FAILED and raises NonFiniteLossError naming the run, where it
happened and what to change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mocolab import tracking
from mocolab.config import Config, flatten
from mocolab.evaluate.weights import BackboneSource


def eval_params(cfg: Config, stage: str, section: Any, source: BackboneSource) -> dict[str, Any]:
    """MLflow params of an evaluation: its section as ``eval.<stage>.*``, the backbone and its origin."""
    params = flatten(section.model_dump(mode="json"), f"eval.{stage}.")
    params.update({f"model.{k}": v for k, v in source.model.model_dump(mode="json").items()})
    params["init"] = source.init
    if source.weights_path:
        params["weights"] = source.weights_path
    if source.pretrain_run_id:
        params["pretrain_run_id"] = source.pretrain_run_id
    return params


def run_eval(
    cfg: Config,
    source: BackboneSource,
    stage: str,
    params: dict[str, Any],
    loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    num_workers: int,
    headline: tuple[str, ...],
    nonfinite_fix: str = "Lower the evaluation's lr, then run again.",
) -> dict[str, Any]:
    """Fit ``loop`` on ``num_workers`` Ray Train workers, log the metrics rank 0 returns and the fit's compute to a
    new ``stage`` run, copy the ``headline`` ones onto the pretraining run. Returns the metrics and ``run_id``.
    A NaN/inf loss the workers recorded raises NonFiniteLossError (run FAILED) ending with ``nonfinite_fix``."""
    from mocolab.runtime import RunInterrupted, ensure_ray, fit, sigint_held, torch_trainer
    from mocolab.train.nonfinite import raise_if_nonfinite

    uri = cfg.tracking.tracking_uri
    run_name = f"{stage}-{source.label}-{cfg.tracking.run_name}"
    run_id = tracking.start_eval_run(
        cfg, stage, params, pretrain_run_id=source.pretrain_run_id, init=source.init, run_name=run_name
    )
    print(f"[mocolab {stage}] {source.label} backbone ({source.model.arch}): MLflow run {run_id}", flush=True)
    try:
        ensure_ray()
        trainer = torch_trainer(
            loop,
            {**loop_config, "source": source, "mlflow_run_id": run_id},
            cfg,
            run_name=f"{run_name}-{run_id[:8]}",
            num_workers=num_workers,
        )
        with tracking.compute_recorded(cfg, run_id, num_workers):
            result = fit(trainer, cfg, num_workers, f"eval.{stage}.num_workers")
    except (KeyboardInterrupt, SystemExit):
        with sigint_held():
            tracking.end_run(uri, run_id, status="KILLED")
        raise RunInterrupted(f"{stage} evaluation interrupted; MLflow run {run_id} marked KILLED") from None
    except BaseException:
        with sigint_held():
            tracking.end_run(uri, run_id, status="FAILED")
        raise
    raise_if_nonfinite(uri, run_id, f"{stage} run '{run_name}' (MLflow run {run_id})", nonfinite_fix)
    metrics = {k: float(v) for k, v in (result.return_value or {}).items()}
    client = tracking.client_for(uri)
    tracking.log_metrics(client, run_id, metrics, step=0)
    if source.pretrain_run_id:
        tracking.record_downstream(
            uri, source.pretrain_run_id, {k: metrics[k] for k in headline if k in metrics}, run_id, stage
        )
    tracking.end_run(uri, run_id, status="FINISHED")
    return {**metrics, "run_id": run_id}
