"""Where an evaluation's backbone comes from: a pretraining run, a weights file, or random init.

``--pretrain-run ID`` reads the run's ``backbone.pt`` and takes ``model.arch`` / ``model.cifar_stem``
from its ``config.yaml``; ``--weights PATH`` reads a torchvision-keyed ``state_dict`` (a mocolab
``backbone.pt`` or torchvision's own ImageNet weights file: ``fc.*`` is dropped) and uses the given
config's ``model`` section; ``--init random`` keeps the freshly initialised backbone. Also the
check that a frozen backbone stayed frozen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from mocolab.cli import add_overrides_argument
from mocolab.config import Config, ConfigError, ModelConfig

INITS = ("pretrain", "random", "supervised", "file")


@dataclass
class BackboneSource:
    """The backbone an evaluation starts from: ``init`` in INITS, its weights (None for random)."""

    init: str
    model: ModelConfig
    state: Optional[dict[str, torch.Tensor]] = field(default=None, repr=False)
    pretrain_run_id: Optional[str] = None
    weights_path: Optional[str] = None

    @property
    def label(self) -> str:
        """A short name for run names and tables: ``moco``, ``random``, ``supervised``, ``file``."""
        return "moco" if self.init == "pretrain" else self.init


class BackboneChangedError(RuntimeError):
    """The frozen backbone's weights or BN statistics changed during linear evaluation."""


def clean_state_dict(state: dict, where: str) -> dict[str, torch.Tensor]:
    """A backbone ``state_dict`` without classifier (``fc.*``) and wrapper (``module.``, ``_orig_mod.``)
    keys; accepts a ``{"state_dict": ...}`` wrapper. Raises ConfigError naming ``where`` otherwise."""
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{where} is not a state_dict of tensors (expected a mocolab backbone.pt or torchvision weights)")
    cleaned = {}
    for key, value in state.items():
        key = key.removeprefix("module.").removeprefix("_orig_mod.")
        if not key.startswith("fc."):
            cleaned[key] = value
    return cleaned


def load_weights_file(path: str) -> dict[str, torch.Tensor]:
    """Read a torchvision-keyed weights file (no download; ``weights_only`` loading)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--weights {path}: no such file")
    return clean_state_dict(torch.load(file, map_location="cpu", weights_only=True), f"--weights {path}")


def resolve_source(
    cfg: Config, pretrain_run: Optional[str] = None, weights: Optional[str] = None, init: Optional[str] = None
) -> BackboneSource:
    """The backbone to evaluate. Exactly one of ``pretrain_run``, ``weights``, ``init="random"``;
    ``init="supervised"`` needs ``weights`` (torchvision's ImageNet weights file)."""
    if init == "supervised" and not weights:
        raise ConfigError("--init supervised needs --weights PATH (a torchvision ResNet weights file; nothing is downloaded)")
    given = [x for x in (pretrain_run, weights, init if init == "random" else None) if x]
    if len(given) != 1:
        raise ConfigError("give exactly one of --pretrain-run RUN_ID, --weights PATH, --init random")
    if pretrain_run:
        from mocolab.tracking import load_pretrain_artifacts

        run_config, state = load_pretrain_artifacts(cfg.tracking.tracking_uri, pretrain_run)
        run_model = run_config.get("model", {})
        model = cfg.model.model_copy(
            update={"arch": run_model.get("arch", cfg.model.arch), "cifar_stem": run_model.get("cifar_stem", False)}
        )
        return BackboneSource("pretrain", model, clean_state_dict(state, f"run {pretrain_run} backbone.pt"), pretrain_run)
    if weights:
        return BackboneSource(
            "supervised" if init == "supervised" else "file", cfg.model, load_weights_file(weights), weights_path=weights
        )
    return BackboneSource("random", cfg.model)


def load_backbone_state(backbone: nn.Module, source: BackboneSource) -> None:
    """Load ``source``'s weights into ``backbone`` (strict); a mismatch names the keys and the fix."""
    if source.state is None:
        return
    missing, unexpected = backbone.load_state_dict(source.state, strict=False)
    if missing or unexpected:
        origin = source.weights_path or f"run {source.pretrain_run_id}"
        raise ConfigError(
            f"weights of {origin} do not fit model.arch={source.model.arch} (cifar_stem={source.model.cifar_stem}): "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}; set model.arch / model.cifar_stem "
            "to the architecture the weights were trained with"
        )


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of every parameter and buffer (BN running statistics included)."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def assert_unchanged(before: dict[str, torch.Tensor], module: nn.Module) -> None:
    """Raise BackboneChangedError naming the entries of ``module`` that differ from ``before``."""
    after = module.state_dict()
    changed = [k for k, v in before.items() if k not in after or not torch.equal(v, after[k].detach().cpu())]
    if changed:
        raise BackboneChangedError(
            f"the frozen backbone changed during linear evaluation ({len(changed)} entries, e.g. {changed[:3]}); "
            "the protocol requires frozen weights and untouched BN statistics"
        )


def add_source_arguments(parser) -> None:
    """The arguments that choose the backbone (shared by ``lincls`` and ``detect``)."""
    parser.add_argument("config", help="the Config YAML (settings under eval.lincls / eval.detection)")
    parser.add_argument("--pretrain-run", metavar="RUN_ID", help="MLflow id of a finished pretraining run")
    parser.add_argument("--weights", metavar="PATH", help="torchvision-keyed backbone weights file (backbone.pt)")
    parser.add_argument(
        "--init",
        choices=("random", "supervised"),
        help="baseline: random init, or supervised (with --weights: torchvision's ImageNet weights file)",
    )
    add_overrides_argument(parser)
