"""Where an evaluation's backbone comes from: a pretraining run, a weights file, or random init.

``--pretrain-run ID`` reads the run's ``backbone.pt`` and takes ``model.arch`` / ``model.cifar_stem``
from its ``config.yaml``; ``--weights PATH`` reads a weights file of any layout ``weights_io.layouts``
knows (mocolab, official MoCo, solo-learn, lightly, torchvision/timm, detectron2) and uses the given
config's ``model`` section; ``--init random`` keeps the freshly initialised backbone. The pre-flight step
checks the weights against the model (:func:`check_source`) before any MLflow run or Ray worker exists.
Also the check that a frozen backbone stayed frozen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mocolab.config import Config, ConfigError, ModelConfig

INITS = ("pretrain", "random", "supervised", "file")


@dataclass
class BackboneSource:
    """The backbone an evaluation starts from: ``init`` in INITS, its weights (None for random)."""

    init: str
    model: ModelConfig
    state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    pretrain_run_id: str | None = None
    weights_path: str | None = None
    origin: str | None = None  # where the weights come from, for messages: "--weights x.pt (solo-learn layout)"
    image_size: int = 224  # the pretraining images' size: a timm ViT's position table is built for it

    @property
    def label(self) -> str:
        """A short name for run names and tables: ``moco``, ``random``, ``supervised``, ``file``."""
        return "moco" if self.init == "pretrain" else self.init


class BackboneChangedError(RuntimeError):
    """The frozen backbone's weights or BN statistics changed during linear evaluation."""


def resolve_source(
    cfg: Config, pretrain_run: str | None = None, weights: str | None = None, init: str | None = None
) -> BackboneSource:
    """The backbone to evaluate. Exactly one of ``pretrain_run``, ``weights``, ``init="random"``;
    ``init="supervised"`` needs ``weights`` (torchvision's ImageNet weights file)."""
    if init == "supervised" and not weights:
        raise ConfigError(
            "--init supervised needs --weights PATH (a torchvision ResNet weights file; nothing is downloaded)"
        )
    given = [x for x in (pretrain_run, weights, init if init == "random" else None) if x]
    if len(given) != 1:
        raise ConfigError("give exactly one of --pretrain-run RUN_ID, --weights PATH, --init random")
    if pretrain_run:
        from mocolab.tracking.artifacts import load_pretrain_artifacts
        from mocolab.weights_io.files import backbone_weights, read_weights_file

        run_config, content = load_pretrain_artifacts(cfg.tracking.tracking_uri, pretrain_run, read_weights_file)
        run_model = run_config.get("model", {})
        update = {key: run_model[key] for key in ("arch", "timm_kwargs") if key in run_model}
        model = cfg.model.model_copy(update=update | {"cifar_stem": run_model.get("cifar_stem", False)})
        size = run_config.get("data", {}).get("image_size", cfg.data.image_size)
        found = backbone_weights(content, f"--pretrain-run {pretrain_run} (its backbone.pt)")
        origin = f"--pretrain-run {pretrain_run} (its backbone.pt, {found.layout.name} layout)"
        return BackboneSource("pretrain", model, found.state, pretrain_run, origin=origin, image_size=size)
    if weights:
        from mocolab.weights_io.files import load_backbone_weights

        found = load_backbone_weights(weights, f"--weights {weights}")
        print(f"[mocolab] --weights {weights}: {found.summary()}", flush=True)
        init = "supervised" if init == "supervised" else "file"
        origin = f"--weights {weights} ({found.layout.name} layout)"
        return BackboneSource(
            init, cfg.model, found.state, weights_path=weights, origin=origin, image_size=cfg.data.image_size
        )
    return BackboneSource("random", cfg.model, image_size=cfg.data.image_size)


def check_source(source: BackboneSource) -> None:
    """ConfigError naming the origin, the keys and the ``--set`` fix if ``source``'s weights do not fit its model."""
    from mocolab.weights_io.arch import check_fits

    if source.state is not None:
        check_fits(source.state, source.model, source.origin or source.label, source.image_size)


def load_backbone_state(backbone: nn.Module, source: BackboneSource) -> None:
    """Load ``source``'s weights into ``backbone`` (strict; the pre-flight step checked that they fit)."""
    if source.state is not None:
        backbone.load_state_dict(source.state, strict=True)


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
