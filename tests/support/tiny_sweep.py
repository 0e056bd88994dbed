"""A tiny sweep on the made digits task (one-epoch trials of 128 images) for tests that run real sweeps."""

from __future__ import annotations

from pathlib import Path

import yaml

TINY_BASE = {
    "moco": {"dim": 16, "queue_size": 64},
    "model": {"arch": "small_cnn"},
    "data": {
        "dataset": "digits",
        "image_size": 16,
        "loader_workers": 0,
        "limit_train": 128,
        "limit_test": 64,
        "digits": {"canvas": 16, "max_scale": 2.0, "copies": 1},
    },
    "train": {"epochs": 1, "batch_size": 32, "knn_k": 10, "checkpoint_every": 1},
    "tracking": {"experiment": "sweeps"},
}


def write_sweep(folder: Path, name: str, space: dict, storage: Path, **fields) -> Path:
    """``base.yaml`` (:data:`TINY_BASE`, checkpoints in ``storage``) and ``<name>.yaml`` (one worker a trial, plus
    ``fields``) in ``folder``; the sweep file's path."""
    base = {**TINY_BASE, "scaling": {"storage_path": str(storage)}}
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = {"name": name, "base": "base.yaml", "space": space, "resources": {"workers": 1}, **fields}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path
