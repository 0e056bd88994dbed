"""``mocolab quickstart``: MoCo on the bundled digits task with 2 Ray workers and shuffle-BN, then kNN, linear
eval and detection, each compared with a random-init encoder of the same architecture under the same protocol.

The settings are ``experiments/pretrain/quickstart.yaml`` and, for the evaluations when that file names none,
``experiments/eval/quickstart.yaml`` (the sources of truth; the package ships them as ``mocolab/quickstart.yaml``
and ``mocolab/quickstart_evals.yaml``, links to those files, so the command also works when installed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mocolab.config import Config, follow_run_seed, load_config

QUICKSTART_CONFIG = Path(__file__).with_name("quickstart.yaml")
QUICKSTART_EVALS = Path(__file__).with_name("quickstart_evals.yaml")
ROW_LABELS = {
    "lincls_top1": "linear top-1 (%)",
    "lincls_top5": "linear top-5 (%)",
    "lincls_fast_top1": "linear top-1, cached features (%)",
    "lincls_fast_top5": "linear top-5, cached features (%)",
    "det_AP": "detection AP (%)",
    "det_AP50": "detection AP50 (%)",
    "det_AP75": "detection AP75 (%)",
}

Row = tuple[str, float | None, float | None]
"""One line of the comparison table: (metric, random init, MoCo)."""


def quickstart_config(seed: int | None = None, overrides: Sequence[str] = ()) -> Config:
    """The quickstart Config, with the quickstart's evaluations when it names none; ``seed`` sets
    ``train.seed``, ``overrides`` are ``KEY=VALUE`` strings."""
    extra = [f"train.seed={seed}"] if seed is not None else []
    cfg = load_config(QUICKSTART_CONFIG, [*extra, *overrides])
    if cfg.eval.lincls is None and cfg.eval.detection is None:
        from mocolab.config import EvalConfig, read_yaml

        evals = EvalConfig.model_validate(read_yaml(QUICKSTART_EVALS).get("eval") or {})
        cfg = follow_run_seed(cfg.model_copy(update={"eval": evals}))
    return cfg


def random_init_metrics(cfg: Config) -> dict[str, float | None]:
    """kNN top-1 (%) of a random-init query encoder built exactly as the pretraining loop builds it (same seed, so
    it is the MoCo run's starting point), under the loop's kNN protocol, and with ``train.linear_probe`` its linear
    probe (``lincls_fast_top1``) as the loop takes it."""
    import torch

    from mocolab.data.sources import dataset_size
    from mocolab.evaluate.probe import linear_probe_top1
    from mocolab.moco.model import MoCo
    from mocolab.runtime import seed_everything
    from mocolab.tracking.names import KNN_TOP1, LINCLS_FAST_METRICS
    from mocolab.train.knn import knn_loaders, knn_top1

    seed_everything(cfg.train.seed)
    backbone = MoCo.from_config(cfg, num_train_samples=dataset_size(cfg.data)).encoder_q.backbone
    loaders = knn_loaders(cfg)
    cpu = torch.device("cpu")
    metrics = {KNN_TOP1: knn_top1(backbone, *loaders, k=cfg.train.knn_k, t=cfg.train.knn_t, device=cpu)}
    if cfg.train.linear_probe:
        probe = linear_probe_top1(backbone, cfg.model.arch, *loaders, cpu, seed=cfg.train.seed)
        metrics[LINCLS_FAST_METRICS[0]] = probe
    return metrics


def final_metric(cfg: Config, run_id: str, name: str) -> float | None:
    """The last logged value of metric ``name`` on an MLflow run (None if never logged)."""
    from mocolab.tracking.store import client_for

    return client_for(cfg.tracking.tracking_uri).get_run(run_id).data.metrics.get(name)


def format_table(rows: Sequence[Row]) -> str:
    """A small text table: metric | random init | MoCo | gain."""

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    header = ("metric", "random init", "MoCo", "gain")
    lines = [
        (name, cell(random), cell(moco), cell(moco - random) if None not in (random, moco) else "-")
        for name, random, moco in rows
    ]
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(4)]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule, *map(fmt, lines)])


def evaluation_rows(cfg: Config, pretrain_run_id: str) -> list[Row]:
    """``(metric, random init, MoCo)`` rows for linear eval and detection: MoCo's values as ``run_pretrain`` copied
    them onto the pretraining run, the random-init baselines run now under the same settings."""
    from mocolab.evaluate.pipeline import headline_metrics, run_random_baselines
    from mocolab.tracking.store import client_for

    moco_metrics = client_for(cfg.tracking.tracking_uri).get_run(pretrain_run_id).data.metrics
    random_metrics = headline_metrics(run_random_baselines(cfg))
    return [(ROW_LABELS[name], value, moco_metrics.get(name)) for name, value in random_metrics.items()]


def run_quickstart(cfg: Config) -> tuple[str, list[Row]]:
    """Pretrain and evaluate per ``cfg`` on Ray, then compare with random init; returns (MLflow run id, rows)."""
    from mocolab.orchestrate import run_pretrain
    from mocolab.tracking.names import KNN_TOP1

    run_id = run_pretrain(cfg)
    rows: list[Row] = [("kNN top-1 (%)", random_init_metrics(cfg)[KNN_TOP1], final_metric(cfg, run_id, KNN_TOP1))]
    return run_id, rows + evaluation_rows(cfg, run_id)
