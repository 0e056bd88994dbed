"""``mocolab quickstart``: MoCo on the bundled digits task with 2 Ray workers and shuffle-BN, compared
with a random-init encoder of the same architecture under the same kNN protocol.

The settings are ``experiments/pretrain/quickstart.yaml`` (the one source of truth; the package ships it
as ``mocolab/quickstart.yaml``, a link to that file, so the command also works when installed).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from mocolab.cli import add_overrides_argument
from mocolab.config import Config, load_config

QUICKSTART_CONFIG = Path(__file__).with_name("quickstart.yaml")

Row = tuple[str, Optional[float], Optional[float]]
"""One line of the comparison table: (metric, random init, MoCo)."""


def quickstart_config(seed: Optional[int] = None, overrides: Sequence[str] = ()) -> Config:
    """The quickstart Config; ``seed`` sets ``train.seed``, ``overrides`` are ``KEY=VALUE`` strings."""
    extra = [f"train.seed={seed}"] if seed is not None else []
    return load_config(QUICKSTART_CONFIG, [*extra, *overrides])


def random_init_knn_top1(cfg: Config) -> float:
    """kNN top-1 (%) of a random-init query encoder built exactly as the pretraining loop builds it
    (same seed, so it is the MoCo run's starting point), under the loop's kNN protocol."""
    import torch

    from mocolab.data.datasets import dataset_size
    from mocolab.moco.model import MoCo
    from mocolab.train.knn import knn_top1
    from mocolab.train.pretrain import knn_loaders, seed_everything

    seed_everything(cfg.train.seed)
    model = MoCo(cfg, num_train_samples=dataset_size(cfg.data))
    train_loader, test_loader = knn_loaders(cfg)
    return knn_top1(
        model.encoder_q.backbone, train_loader, test_loader, k=cfg.train.knn_k, t=cfg.train.knn_t,
        device=torch.device("cpu"),
    )


def final_metric(cfg: Config, run_id: str, name: str) -> Optional[float]:
    """The last logged value of metric ``name`` on an MLflow run (None if never logged)."""
    from mocolab.tracking import client_for

    return client_for(cfg.tracking.tracking_uri).get_run(run_id).data.metrics.get(name)


def format_table(rows: Sequence[Row]) -> str:
    """A small text table: metric | random init | MoCo | gain."""

    def cell(value: Optional[float]) -> str:
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


def run_quickstart(cfg: Config) -> tuple[str, list[Row]]:
    """Pretrain per ``cfg`` on Ray, then compare with random init; returns (MLflow run id, table rows)."""
    from mocolab.train.launch import run_pretrain

    run_id = run_pretrain(cfg)
    rows: list[Row] = [("kNN top-1 (%)", random_init_knn_top1(cfg), final_metric(cfg, run_id, "knn_top1"))]
    from mocolab.evaluate.pipeline import quickstart_eval_rows

    rows += quickstart_eval_rows(cfg, run_id)  # linear eval and detection, MoCo vs random init
    return run_id, rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=None, help="train.seed (default: the config's)")
    add_overrides_argument(parser, "override a key of experiments/pretrain/quickstart.yaml (repeatable)")


def main(args: argparse.Namespace) -> int:
    cfg = quickstart_config(args.seed, args.overrides)
    run_id, rows = run_quickstart(cfg)
    from mocolab.tracking import redact

    print(f"\nquickstart: run '{cfg.tracking.run_name}' (MLflow run {run_id}, {redact(cfg.tracking.tracking_uri)})")
    print(format_table(rows))
    return 0
