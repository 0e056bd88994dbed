"""Pretrain, then evaluate: the one sequence behind ``mocolab pretrain``, ``mocolab quickstart`` and every sweep
trial, above ``train/`` (pretraining) and ``evaluate/`` (the ``eval.*`` sections).

The caller has run the pre-flight step (:mod:`mocolab.preflight`) for the whole command; nothing here checks
files or data again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mocolab.config import Config
from mocolab.tracking.masking import redact
from mocolab.tracking.runs import start_pretrain_run, ui_link
from mocolab.tracking.store import client_for


def pretrain_and_evaluate(
    cfg: Config,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    callbacks: Sequence[Any] = (),
) -> str:
    """Pretrain per ``cfg`` (resuming an unfinished run of the same ``tracking.run_name``), then run the
    evaluations ``cfg.eval`` names, each its own MLflow run linked to this one. Returns the MLflow run id.

    ``parent_run_id`` / ``extra_tags`` file the run under a sweep; ``callbacks`` go to the Ray run (Tune's).
    Raises RunFinishedError (a ConfigError) if the name belongs to a finished run, RunInterrupted (a
    KeyboardInterrupt naming the run to resume) on Ctrl-C; the MLflow run is never left RUNNING."""
    from mocolab.data.sources import summarize
    from mocolab.moco.mechanisms import run_params
    from mocolab.train.launch import fit_pretrain

    run_id, resumed = start_pretrain_run(cfg, parent_run_id, extra_tags, run_params(cfg), summarize(cfg.data, "train"))
    print(
        f"[mocolab] {'resuming' if resumed else 'starting'} run '{cfg.tracking.run_name}' "
        f"(MLflow run {run_id}, experiment '{cfg.tracking.experiment}', {redact(cfg.tracking.tracking_uri)})",
        flush=True,
    )
    client = client_for(cfg.tracking.tracking_uri)
    link = ui_link(cfg.tracking.tracking_uri, client.get_run(run_id).info.experiment_id, run_id)
    if link:
        print(f"[mocolab] MLflow UI: {link}", flush=True)
    fit_pretrain(cfg, run_id, callbacks)
    if cfg.eval.lincls is not None or cfg.eval.detection is not None:
        from mocolab.evaluate.pipeline import run_configured_evals

        run_configured_evals(cfg, run_id)
    return run_id


def run_pretrain(cfg: Config) -> str:
    """The ``mocolab pretrain`` command on a loaded config: pre-flight, then :func:`pretrain_and_evaluate`."""
    from mocolab.preflight import configured_stages, preflight

    preflight(cfg, configured_stages(cfg))
    return pretrain_and_evaluate(cfg)
