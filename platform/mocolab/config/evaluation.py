"""The ``eval`` section: linear classification (and its protocols) and detection transfer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from mocolab.config.base import _as_text, _is_timm_vit, _Section, is_uri
from mocolab.config.data import DataConfig

RUN_SEED_TEXT = "default: train.seed (set when the config is built, so params show the value used)"


class LinclsConfig(_Section):
    """Linear classification on frozen features; ``protocol`` fills ``lr``, ``schedule`` and ``lr_per_256`` where
    they are unset (:func:`resolve_lincls`, from the evaluated backbone)."""

    protocol: Literal["moco", "v3"] | None = Field(
        None, description="default: v3 for a timm ViT backbone, else moco (LINCLS_PROTOCOLS; explicit keys win)"
    )
    dataset: DataConfig | None = Field(None, description="default: the pretraining run's data section")
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(256, ge=1, description="per worker")
    lr: float | None = Field(None, gt=0, description="protocol: 30 (moco); 3 per 256 (v3, ViT), 0.1 (v3, other)")
    lr_per_256: bool | None = Field(
        None, description="lr per 256 images of the global batch (batch_size x num_workers); protocol: v3 only"
    )
    schedule: Literal["step", "cosine"] | None = Field(
        None, description="protocol: step (moco: x0.1 at the milestones), cosine per epoch (v3)"
    )
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    milestones: list[float] = Field(default_factory=lambda: [0.6, 0.8], description="fractions of the epochs")
    fast: bool = Field(False, description="train on features extracted once (no augmentation)")
    num_workers: int = Field(1, ge=1)
    seed: int | None = Field(None, description=RUN_SEED_TEXT)

    @field_validator("milestones")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < m < 1 for m in v) or v != sorted(v):
            raise ValueError(f"eval.lincls.milestones={v} must be increasing fractions of the epochs in (0, 1)")
        return v


LINCLS_PROTOCOLS: dict[str, dict[str, Any]] = {
    "moco": {"lr": 30.0, "lr_per_256": False, "schedule": "step"},
    "v3": {"lr_per_256": True, "schedule": "cosine"},
}
"""``eval.lincls.protocol``: moco = the MoCo v1/v2 ``main_lincls.py`` (SGD lr 30, x0.1 at 60 % and 80 %); v3 = the v3
code's ``main_lincls.py`` (c349e6e): SGD, lr per 256 images, cosine per epoch, no weight decay, the class token of a
ViT (what a timm ViT built with ``num_classes=0`` returns), no BN before the linear layer. The v3 lr is its
CONFIG.md's ViT recipe (``--lr=3``) for a ViT and its default (0.1) otherwise (:data:`V3_LINCLS_LR`). Kept from the
shared keys: ``epochs`` (v3: 90) and ``batch_size`` (v3: 1024 in all)."""
V3_LINCLS_LR = {"vit": 3.0, "other": 0.1}


def resolve_lincls(lin: LinclsConfig, arch: str) -> LinclsConfig:
    """``lin`` with ``protocol`` (v3 for a timm ViT ``arch``, else moco) and the protocol's ``lr``, ``lr_per_256``
    and ``schedule`` where ``lin`` leaves them unset. Idempotent."""
    vit = _is_timm_vit(arch)
    protocol = lin.protocol or ("v3" if vit else "moco")
    preset = dict(LINCLS_PROTOCOLS[protocol])
    if protocol == "v3":
        preset["lr"] = V3_LINCLS_LR["vit" if vit else "other"]
    given = {key: getattr(lin, key) for key in preset}
    return lin.model_copy(
        update={"protocol": protocol, **{k: v if v is not None else preset[k] for k, v in given.items()}}
    )


class DetectionDataConfig(_Section):
    format: Literal["voc", "coco"] = "voc"
    root: str | None = Field(
        None, description="VOC root (JPEGImages/, Annotations/, ImageSets/) or COCO image dir; a local path"
    )
    train_split: str = "train"
    val_split: str = "val"
    train_json: Path | None = None
    val_json: Path | None = None
    classes: list[str] | None = Field(None, description="VOC class names; default: labels.txt or from the XML")
    made_digits: bool = Field(False, description="make a VOC set of digits on canvases (no download)")

    _root_as_text = field_validator("root", mode="before")(classmethod(lambda cls, v: _as_text(v)))

    @field_validator("root")
    @classmethod
    def _local_root(cls, v: str | None) -> str | None:
        if v is not None and is_uri(v):
            raise ValueError(
                f"{v}: detection reads a local or NFS folder, not an object store; copy the set to a path "
                "every worker node mounts"
            )
        return v


class DetectionConfig(_Section):
    data: DetectionDataConfig = Field(default_factory=DetectionDataConfig)
    fpn: bool = True
    bn: Literal["frozen", "train", "sync"] = Field(
        "sync",
        description="backbone BN: sync = statistics of the global batch, fine-tuned, for every init (the paper's "
        "SyncBN; torch SyncBatchNorm on GPU, an all-reduce BN over gloo on CPU); train = per-worker batch; "
        "frozen = FrozenBatchNorm2d with the loaded statistics (no normalisation at all for a random init)",
    )
    min_size: int = Field(480, ge=32)
    max_size: int = Field(800, ge=32)
    iterations: int = Field(24000, ge=1)
    batch_size: int = Field(2, ge=1, description="images per worker")
    lr: float = Field(0.02, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    milestones: list[float] = Field(default_factory=lambda: [0.75, 0.92])
    warmup_iters: int = Field(
        100, ge=0, description="linear lr warm-up from warmup_factor x lr (detectron2's WARMUP_ITERS)"
    )
    warmup_factor: float = Field(0.001, gt=0, le=1)
    clip_grad_norm: float | None = Field(None, gt=0, description="clip the global gradient L2 norm to this; null: off")
    trainable_layers: int = Field(5, ge=0, le=5)
    roi_batch_size: int = Field(512, ge=1, description="RoIs sampled per image for the box head in training")
    test_proposals: int = Field(1000, ge=1, description="RPN proposals per image scored by the box head at test")
    anchor_sizes: list[int] | None = Field(None, description="RPN anchor sides in px; default 32..512 x min_size/800")
    num_workers: int = Field(1, ge=1)
    seed: int | None = Field(None, description=RUN_SEED_TEXT)


class EvalConfig(_Section):
    lincls: LinclsConfig | None = None
    detection: DetectionConfig | None = None
