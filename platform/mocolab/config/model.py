"""The ``moco`` and ``model`` sections: the method and the backbone."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from mocolab.config.base import TIMM_PREFIX, _Section


class MocoConfig(_Section):
    version: Literal["v1", "v2", "v3"] = Field(
        "v2",
        description="preset (config.PRESETS): v1/v2 set mlp, temperature, data.augment, train.schedule; v3 "
        "sets the mechanism, heads, momentum schedule, BN, optimizer and lr recipe",
    )
    mechanism: str = Field("moco", description="moco | end_to_end | memory_bank | moco_v3 (see moco/mechanisms/)")
    dim: int = Field(128, gt=0, description="embedding dimension; preset: 256 (v3)")
    mlp_dim: int = Field(4096, gt=0, description="moco_v3: hidden width of the projector and predictor MLPs")
    momentum_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="cosine: moco.momentum raised to 1 over the run, per step (v3's moco-m-cos)"
    )
    queue_size: int = Field(
        65536,
        gt=0,
        description="K: negatives in the queue (moco) or drawn per step (memory_bank); end_to_end: K = global batch",
    )
    momentum: float = 0.999
    momentum_warmup_epochs: int = Field(
        0, ge=0, description="epochs at moco.warmup_momentum before moco.momentum (or its schedule) takes over"
    )
    warmup_momentum: float = Field(
        0.99, ge=0, le=1, description="the key encoder's momentum during moco.momentum_warmup_epochs"
    )
    temperature: float = Field(0.2, description="preset: 0.07 (v1), 0.2 (v2)")
    mlp: bool = Field(True, description="MLP projection head; preset: false (v1), true (v2)")
    symmetric: bool = Field(
        False,
        description="both crops as query and key; the loss is the SUM of the two directions' mean losses (MoCo "
        "CIFAR-10 demo), so each step's gradient is about twice the asymmetric one's: keep train.lr as for the "
        "asymmetric loss to follow the demo, or halve it to match its gradient scale",
    )
    bank_momentum: float = Field(0.5, description="memory_bank: InstDisc update momentum of the stored rows")

    @field_validator("mechanism")
    @classmethod
    def _registered(cls, v: str) -> str:
        from mocolab.moco.mechanisms import MECHANISMS  # names only: no torch

        if v not in MECHANISMS:
            raise ValueError(f"moco.mechanism={v!r} is not one of {', '.join(MECHANISMS)}")
        return v

    @field_validator("momentum")
    @classmethod
    def _momentum_range(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"moco.momentum={v} is outside [0, 1]; the paper uses 0.999 (0.99 for CIFAR)")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature_positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError(f"moco.temperature={v} must be > 0; the paper uses 0.07 (v1) or 0.2 (v2)")
        return v

    @field_validator("bank_momentum")
    @classmethod
    def _bank_momentum_range(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"moco.bank_momentum={v} is outside [0, 1); InstDisc uses 0.5")
        return v


BUILTIN_ARCHS = ("small_cnn", "resnet18", "resnet34", "resnet50")


class ModelConfig(_Section):
    arch: str = Field("resnet18", description="small_cnn | resnet18 | resnet34 | resnet50 | timm:<timm model name>")
    timm_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="timm:<name> only: extra timm.create_model arguments (e.g. {depth: 4, patch_size: 8}); "
        "num_classes=0 and a ViT's img_size (data.image_size) are set by mocolab",
    )
    vit_sincos_pos: bool = Field(
        False, description="timm ViTs: fixed 2-D sin-cos position embedding; preset: true (v3)"
    )
    vit_freeze_patch_proj: bool = Field(
        False, description="timm ViTs: frozen random patch projection (v3's stop_grad_conv1); preset: true (v3)"
    )
    cifar_stem: bool = False
    bn: Literal["shuffle", "split", "sync", "plain"] = Field(
        "shuffle",
        description="sync: every BN synchronised across workers (SyncBatchNorm on GPU, an all-reduce BN "
        "over gloo on CPU); preset: sync (v3)",
    )
    bn_splits: int = Field(8, ge=1)
    channels_last: bool | None = Field(None, description="default: true on GPU, false on CPU")
    compile: bool = False
    init_weights: Path | None = Field(
        None,
        description="pretraining starts both encoders' backbones from this weights file (any layout --weights "
        "reads; the pre-flight step checks it against model.arch)",
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        if v not in BUILTIN_ARCHS and not (v.startswith(TIMM_PREFIX) and len(v) > len(TIMM_PREFIX)):
            names = f"{', '.join(BUILTIN_ARCHS)}, {TIMM_PREFIX}<timm model name>"
            raise ValueError(f"model.arch={v!r} is not one of {names}")
        return v
