"""The pre-flight step: every check that needs more than the config itself, run once by the driver.

``mocolab.config`` holds the pure rules (types, ranges, fields that must agree). What needs the filesystem,
the dataset or a library is checked here, once per command and before any Ray worker starts or any MLflow run
is created: data folders and split/class layout (no symbolic link loops), the training-set size against the batch
and the mechanism (e.g. the memory bank's K), the augmentation policy (albumentations), the evaluation datasets,
the workers against what a local Ray can ever hold, the storage path and the tracking store. Workers trust the
driver and re-run none of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from mocolab.config import Config
from mocolab.preflight.cluster import check_capacity, check_on_worker_nodes
from mocolab.preflight.data import check_detection, check_lincls, check_pretrain, lincls_key
from mocolab.preflight.report import PreflightReport

STAGES = ("pretrain", "lincls", "detection")


def _check_source(source) -> None:
    """The evaluated backbone's weights fit ``model.arch`` (strictly), here rather than in a worker."""
    from mocolab.evaluate.weights import check_source

    check_source(source)


def preflight(
    configs: Config | Sequence[Config],
    stages: Iterable[str] = ("pretrain",),
    source=None,
    quiet: bool = False,
    concurrent: int = 1,
) -> PreflightReport:
    """Run the driver-side checks of ``configs`` (one run, or every trial of a sweep) for ``stages``
    (``pretrain`` and/or the evaluations ``lincls``, ``detection``), then of the workers against a local Ray
    (``concurrent`` runs at once: a sweep's trials), their storage paths and tracking stores. ``source``: the
    evaluated backbone (:class:`mocolab.evaluate.weights.BackboneSource`) of an evaluation command, whose weights
    must fit its ``model.arch``. Raises ConfigError naming the field or file and the fix; prints one line when
    every check passed (unless ``quiet``)."""
    from mocolab import tracking
    from mocolab.storage import check_storage_path

    configs = [configs] if isinstance(configs, Config) else list(configs)
    stages = tuple(stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"preflight: unknown stage(s) {unknown}; choose from {STAGES}")
    report = PreflightReport()
    done: set[str] = set()  # evaluation sections already checked (a sweep's trials share them)
    for cfg in configs:
        if "pretrain" in stages:
            check_pretrain(cfg, report)
        if "lincls" in stages and (key := "lincls" + lincls_key(cfg)) not in done:
            check_lincls(cfg)
            done.add(key)
        model_cfg = source.model if source is not None else cfg.model
        if "detection" in stages and (key := f"det{cfg.eval.detection}{model_cfg}") not in done:
            check_detection(cfg, model_cfg, report)
            done.add(key)
    if source is not None:
        _check_source(source)
    check_capacity(configs, stages, concurrent)
    from mocolab.runtime import uses_cluster

    if uses_cluster():
        check_on_worker_nodes(configs, stages, report)
    for storage in sorted({cfg.scaling.storage_path for cfg in configs}):
        check_storage_path(storage)
    for uri in sorted({cfg.tracking.tracking_uri for cfg in configs}):
        tracking.check_reachable(uri)
    if not quiet:
        print(report.summary(), flush=True)
    return report


def configured_stages(cfg: Config, pretrain: bool = True) -> tuple[str, ...]:
    """The stages a run of ``cfg`` goes through: pretraining, then the evaluations its ``eval`` section names."""
    stages = ("pretrain",) if pretrain else ()
    return stages + tuple(name for name in ("lincls", "detection") if getattr(cfg.eval, name) is not None)
