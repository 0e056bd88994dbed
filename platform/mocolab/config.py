"""The one configuration schema of mocolab: pydantic models, YAML loading and ``--set`` overrides.

Every rule that can be checked before compute is spent lives here, so that ``mocolab pretrain``,
``mocolab sweep`` (per trial) and the evaluations refuse a bad config with a message naming the
field and the fix. Paths and the tracking URI are made absolute at load (Ray Tune gives each trial
its own working directory).
"""

from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

DIGIT_SIDE = 8  # scikit-learn's bundled digits are 8 x 8
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
"""Run names: they become folders under ``scaling.storage_path`` (no ``/``, no ``..``)."""


class ConfigError(ValueError):
    """A config that cannot run; the message names the field and how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


PRESETS: dict[str, dict[str, Any]] = {
    "v1": {"moco.mlp": False, "moco.temperature": 0.07, "data.augment": "moco_v1", "train.schedule": "step"},
    "v2": {"moco.mlp": True, "moco.temperature": 0.2, "data.augment": "moco_v2", "train.schedule": "cosine"},
    "v3": {
        "moco.mechanism": "moco_v3",
        "moco.symmetric": True,
        "moco.momentum": 0.99,
        "moco.momentum_schedule": "cosine",
        "moco.dim": 256,
        "moco.mlp_dim": 4096,
        "model.bn": "sync",
        "model.vit_sincos_pos": True,
        "model.vit_freeze_patch_proj": True,
        "data.augment": "moco_v2",
        "train.schedule": "cosine",
        "train.lr_per_256": True,
        "train.warmup_epochs": 10,
    },
}
"""``moco.version`` as a preset: the keys it sets unless the YAML or ``--set`` gives them. v1 (He et al. 2020):
linear head, T=0.07, the v1 augmentation, step lr; v2 (Chen et al. 2020): MLP head, T=0.2, blur, cosine lr;
v3 (Chen, Xie, He 2021; the official code's defaults and README recipes): no queue, symmetric loss, projector and
predictor MLPs, cosine momentum from 0.99, every BN synchronised, lr per 256 images, 10 warm-up epochs, plus
:data:`V3_ARCH_PRESETS` by backbone. Left out of v3: its asymmetric augmentations (blur 1.0/0.1, solarisation;
data.augment stays moco_v2), the ResNet's zero-init residual and the ViT's own weight init. Departures: the warm-up
(shared with v1/v2) is ``(step + 1) / warmup_steps`` where the v3 code's ``adjust_learning_rate`` starts at 0 (its
first step does not move the weights); AdamW, as in the v3 code, decays every parameter (biases, norms, the class
token and the position table too), unlike LARS, which leaves out those with ndim <= 1."""
V3_ARCH_PRESETS: dict[str, dict[str, Any]] = {
    "vit": {"moco.temperature": 0.2, "train.optimizer": "adamw", "train.lr": 1.5e-4, "train.weight_decay": 0.1},
    "other": {"moco.temperature": 1.0, "train.optimizer": "lars", "train.lr": 0.6, "train.weight_decay": 1e-6},
}
"""The v3 preset's keys that depend on ``model.arch``: a timm ViT (AdamW recipe) or any other backbone (LARS)."""
STEP_MILESTONE_FRACTIONS = (0.6, 0.8)
"""Default ``train.lr_milestones`` of the step schedule: the paper's epochs 120 and 160 of 200, scaled."""


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
TIMM_PREFIX = "timm:"


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


class DigitsConfig(_Section):
    """The made task built from scikit-learn's bundled 8x8 digits (the offline default)."""

    canvas: int = Field(16, ge=8, description="side of the black canvas the digit is placed on")
    min_scale: float = Field(1.0, gt=0, description="smallest digit: 8 x min_scale px")
    max_scale: float = Field(2.0, gt=0, description="largest digit: 8 x max_scale px, at most the canvas")
    copies: int = Field(2, ge=1, description="random placements of each training digit")
    test_fraction: float = Field(0.25, gt=0, lt=1)
    seed: int = 0

    @model_validator(mode="after")
    def _digit_fits_canvas(self) -> DigitsConfig:
        if self.min_scale > self.max_scale:
            raise ValueError(
                f"data.digits.min_scale={self.min_scale} is above data.digits.max_scale={self.max_scale}; swap them"
            )
        side = round(DIGIT_SIDE * self.max_scale)
        if side > self.canvas:
            raise ValueError(
                f"data.digits.max_scale={self.max_scale} makes digits of {side} px, larger than "
                f"data.digits.canvas={self.canvas}; use max_scale <= {self.canvas / DIGIT_SIDE:g} or a larger canvas"
            )
        return self


LABELED_DATASETS = ("digits", "imagefolder", "cifar10")
"""``data.dataset`` values with labels (a test split and classes); ``folder`` is unlabeled images for pretraining."""


DEVICE_RECIPES = ("moco_v1", "moco_v2", "none")
"""``data.augment`` values that ``data.pipeline=device`` runs (``data/device_augment.py``)."""


class DataConfig(_Section):
    dataset: Literal["digits", "imagefolder", "cifar10", "folder"] = Field(
        "digits",
        description="imagefolder: root/<split>/<class>/<image>; folder: every image anywhere under data.root, "
        "no labels, no splits (pretraining only)",
    )
    root: str | None = Field(
        None,
        description="the dataset's folder (local or NFS path, made absolute at load) or an object-store URI "
        "(s3://bucket/prefix, gs://...; endpoint and credentials from the AWS environment, kept as given)",
    )
    reader: Literal["loader", "stream"] = Field(
        "loader",
        description="how pretraining reads data.root: loader = a torch DataLoader per worker (resume at any "
        "checkpoint, bit-identical); stream = Ray Data (decode + two-crop in CPU tasks, which Ray may place on "
        "CPU-only nodes; shards via get_dataset_shard; resume at the epoch of a checkpoint, order not identical)",
    )
    pipeline: Literal["cpu", "device"] = Field(
        "cpu",
        description="where pretraining decodes and two-crops: cpu = albumentations in the loader or Ray Data tasks; "
        "device = the CPU only reads file bytes, the worker's device decodes (torchvision decode_jpeg, batched) and "
        "augments (kornia, same moco_v1/moco_v2/none recipes; custom op lists refused); see docs/device_pipeline.md",
    )
    stream_cpus: float = Field(
        1,
        ge=0,
        description="data.reader=stream: CPUs each Ray Data read/decode/augment task asks for; 0 runs them on the "
        "CPUs the training workers hold (a machine with no CPU to spare, e.g. 2 workers on 2 CPUs)",
    )
    train_split: str = Field("train", description="unused by folder")
    test_split: str = Field("test", description="unused by folder")
    augment: str | list[dict[str, Any]] = Field(
        "moco_v2",
        description="moco_v1 | moco_v2 | none, or a list of albumentations ops; preset: moco_v1 (v1), moco_v2 (v2)",
    )
    image_size: int = Field(32, ge=8)
    loader_workers: int | Literal["auto"] = "auto"
    on_corrupt: Literal["fail", "skip"] = "fail"
    limit_train: int | None = Field(None, gt=0, description="use only the first N training images")
    limit_test: int | None = Field(None, gt=0)
    digits: DigitsConfig = Field(default_factory=DigitsConfig)

    _root_as_text = field_validator("root", mode="before")(classmethod(lambda cls, v: _as_text(v)))

    @field_validator("root")
    @classmethod
    def _root_names_a_location(cls, v: str | None) -> str | None:
        return _names_a_location(v)

    @field_validator("loader_workers")
    @classmethod
    def _loader_workers_count(cls, v: int | str) -> int | str:
        if v != "auto" and v < 0:
            raise ValueError(f"data.loader_workers={v} must be >= 0 or 'auto' (one fewer than scaling.cpus_per_worker)")
        return v


class TrainConfig(_Section):
    epochs: int = Field(200, ge=1)
    batch_size: int = Field(256, ge=2, description="per worker")
    lr: float = Field(0.03, gt=0, description="with train.lr_per_256: per 256 images of the global batch")
    lr_per_256: bool = Field(
        False, description="scale train.lr by the global batch / 256 (v3's linear scaling rule); preset: true (v3)"
    )
    optimizer: Literal["sgd", "lars", "adamw"] = Field(
        "sgd",
        description="lars: v3's LARS (no decay or adaptation of biases and norms); adamw: as the v3 code (every "
        "parameter decayed); preset: adamw for timm ViTs, lars otherwise (v3)",
    )
    schedule: Literal["cosine", "step"] = Field("cosine", description="preset: step (v1), cosine (v2)")
    lr_milestones: list[int] = Field(
        default_factory=list, description="step schedule: epochs of x lr_decay; default 60% and 80% of train.epochs"
    )
    lr_decay: float = Field(0.1, gt=0, le=1)
    warmup_epochs: int = Field(0, ge=0)
    sgd_momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    seed: int = 0
    amp: Literal["bf16", "fp16", "off"] = Field(
        "off",
        description="autocast precision of the step: bf16 (A100/H100, CPU), fp16 with a GradScaler (V100/T4), off = "
        "fp32; YAML's false/off read as off",
    )
    check_finite_every: int = Field(
        100,
        ge=1,
        description="steps between checks that the loss stayed finite (one host read + all-reduce each, and at "
        "every epoch end); a NaN/inf stops the run at the next check, naming the step where it first appeared",
    )
    deterministic: bool = False
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints")
    keep_checkpoints: int = Field(2, ge=1)
    knn_every: int = Field(1, ge=0, description="epochs between kNN monitor evaluations; 0 disables it")
    knn_dataset: DataConfig | None = Field(
        None,
        description="labeled data of the kNN monitor (its train split is the bank, its test split the queries); "
        "default: the data section, unless data.dataset=folder (no labels: the monitor is then off)",
    )
    knn_k: int = Field(200, ge=1)
    knn_t: float = Field(0.1, gt=0)
    linear_probe: bool = Field(
        False,
        description="after the last epoch, also the linear probe (lincls_fast_top1: eval.lincls's fast protocol with "
        "its defaults) on the kNN monitor's images; needs the monitor (train.knn_every > 0)",
    )
    knn_bank_images: int | None = Field(
        None, gt=0, description="kNN monitor: at most this many training images as its bank, evenly spaced (all: null)"
    )
    knn_test_images: int | None = Field(
        None, gt=0, description="kNN monitor: at most this many test images as its queries, evenly spaced (all: null)"
    )
    max_failures: int = Field(0, ge=0, description="Ray Train FailureConfig retries of a failed worker group")

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        """YAML reads ``off``/``false`` as False; ``true`` was the bf16 switch before train.amp named the precision."""
        return {False: "off", True: "bf16"}.get(v, v) if isinstance(v, bool) else v


class ScalingConfig(_Section):
    num_workers: int = Field(2, ge=1, description="Ray Train workers; shuffle-BN needs >= 2")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    storage_path: str = Field("ray_results", description="local dir, NFS or s3:// URI for Ray checkpoints")
    start_timeout_s: float = Field(
        600,
        gt=0,
        description="how long Ray Train may wait for the workers' resources (an autoscaling cluster adding nodes) "
        "before the run fails naming what is pending; a local Ray that can never hold them is refused at once",
    )

    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each worker also asks for, e.g. {spot_a100: 1} to run only on nodes "
        "started with --resources='{\"spot_a100\": N}' (N workers each); CPU and GPU come from cpus_per_worker "
        "and use_gpu",
    )

    @field_validator("storage_path")
    @classmethod
    def _uri_names_a_location(cls, v: str) -> str:
        scheme, sep, rest = v.partition("://")
        if sep and not rest.strip("/"):
            raise ValueError(f"scaling.storage_path={v} names no bucket or folder; use {scheme}://BUCKET/prefix")
        return v

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_resources_only(cls, v: dict[str, float]) -> dict[str, float]:
        builtin = [name for name in v if name.upper() in ("CPU", "GPU")]
        if builtin:
            raise ValueError(
                f"scaling.resources_per_worker names {builtin}: set scaling.cpus_per_worker and scaling.use_gpu "
                "instead; this field is for custom node resources"
            )
        not_positive = {name: amount for name, amount in v.items() if amount <= 0}
        if not_positive:
            raise ValueError(f"scaling.resources_per_worker={not_positive}: amounts must be > 0 (drop the key instead)")
        return v


class TrackingConfig(_Section):
    experiment: str = Field("mocolab", min_length=1)
    run_name: str | None = Field(None, description="letters, digits, '.', '_', '-' (it names the Ray storage folder)")
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    register_model: str | None = Field(
        None, description="register the final backbone (the logged model 'backbone') under this model-registry name"
    )
    system_metrics_interval_s: float = Field(
        10.0, ge=0, description="seconds between system-metric samples (CPU, memory, GPU) of a pretraining run; 0: off"
    )
    price_per_device_hour: float | None = Field(
        None,
        gt=0,
        description="price of one device-hour (a GPU-hour with scaling.use_gpu, else a CPU-hour); runs then log cost",
    )

    @field_validator("run_name")
    @classmethod
    def _run_name_is_a_folder_name(cls, v: str | None) -> str | None:
        if v is not None and not SAFE_NAME.match(v):
            raise ValueError(
                f"tracking.run_name={v!r}: use letters, digits, '.', '_' and '-' (it names the run's folder under "
                "scaling.storage_path)"
            )
        return v


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


def follow_run_seed(cfg: Config) -> Config:
    """Set, in place, every evaluation seed left unset (``eval.lincls.seed``, ``eval.detection.seed``) to
    ``train.seed``: a run's seeds (``--seeds``, a sweep's ``seeds``) vary its evaluations too. Returns ``cfg``."""
    for section in (cfg.eval.lincls, cfg.eval.detection):
        if section is not None and section.seed is None:
            section.seed = cfg.train.seed
    return cfg


class Config(_Section):
    """A pretraining run: everything ``mocolab pretrain`` needs."""

    moco: MocoConfig = Field(default_factory=MocoConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            apply_preset(raw)
        return raw

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Config:
        check_run_rules(self)
        return follow_run_seed(self)

    @property
    def global_batch(self) -> int:
        return self.train.batch_size * self.scaling.num_workers

    @property
    def base_lr(self) -> float:
        """The peak learning rate: ``train.lr``, times the global batch / 256 with ``train.lr_per_256``."""
        return self.train.lr * self.global_batch / 256 if self.train.lr_per_256 else self.train.lr

    @property
    def knn_data(self) -> DataConfig | None:
        """The kNN monitor's labeled data: ``train.knn_dataset``, else the data section when it has labels;
        None (the monitor is off) for unlabeled ``data.dataset=folder`` without a ``train.knn_dataset``."""
        if self.train.knn_dataset is not None:
            return self.train.knn_dataset
        return self.data if self.data.dataset in LABELED_DATASETS else None

    def flat(self) -> dict[str, Any]:
        """The config as dotted keys (``moco.temperature``): MLflow params and sweep axes use these."""
        return flatten(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        """The resolved config as YAML (what ``mocolab config`` prints)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _raw_get(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def apply_preset(raw: dict[str, Any]) -> None:
    """Fill, in place, the keys of the ``moco.version`` preset that ``raw`` does not set (see PRESETS), and the
    step schedule's default milestones (60% and 80% of ``train.epochs``). Explicit keys always win."""
    version = _raw_get(raw, "moco.version") or "v2"
    preset = dict(PRESETS.get(version, {}))
    if version == "v3":
        preset.update(V3_ARCH_PRESETS["vit" if _is_timm_vit(_raw_get(raw, "model.arch")) else "other"])
    for dotted, value in preset.items():
        if _raw_get(raw, dotted) is None:
            set_dotted(raw, dotted, value)
    if _raw_get(raw, "train.schedule") == "step" and not _raw_get(raw, "train.lr_milestones"):
        epochs = _raw_get(raw, "train.epochs") or TrainConfig.model_fields["epochs"].default
        first = max(1, round(STEP_MILESTONE_FRACTIONS[0] * epochs))
        set_dotted(raw, "train.lr_milestones", [first, max(first + 1, round(STEP_MILESTONE_FRACTIONS[1] * epochs))])


def _is_timm_vit(arch: Any) -> bool:
    if not isinstance(arch, str) or not arch.startswith(TIMM_PREFIX):
        return False
    from mocolab.moco.timm_backbones import is_vit_name

    return is_vit_name(arch.removeprefix(TIMM_PREFIX))


def check_run_rules(cfg: Config) -> None:
    """Rules that involve several fields and need nothing but the config (no files, no dataset, no
    albumentations: those are :mod:`mocolab.preflight`'s); raise ValueError naming the field and the fix."""
    from mocolab.moco.mechanisms import mechanism_class
    from mocolab.moco.mechanisms.base import DictionarySettings

    moco, train, scaling, model, data = cfg.moco, cfg.train, cfg.scaling, cfg.model, cfg.data
    mechanism_class(moco.mechanism).check(DictionarySettings.from_config(cfg))
    if model.bn == "shuffle" and scaling.num_workers < 2:
        raise ValueError(
            "model.bn=shuffle needs scaling.num_workers >= 2 (keys are shuffled across workers); "
            "with one worker use model.bn=split, which emulates it with SplitBatchNorm"
        )
    if model.bn == "split" and train.batch_size % model.bn_splits:
        raise ValueError(
            f"model.bn_splits={model.bn_splits} must divide train.batch_size={train.batch_size} "
            "(each split normalises its own sub-batch)"
        )
    if model.arch == "small_cnn" and model.cifar_stem:
        raise ValueError("model.cifar_stem applies to ResNets only; set it false for model.arch=small_cnn")
    check_timm_arch(model, data.image_size)
    if data.dataset in ("imagefolder", "cifar10", "folder") and data.root is None:
        raise ValueError(f"data.root is required for data.dataset={data.dataset}; give the dataset folder")
    if data.reader == "stream" and data.dataset not in ("imagefolder", "folder"):
        raise ValueError(
            f"data.reader=stream reads image files (data.dataset imagefolder or folder); data.dataset={data.dataset} "
            "is held in memory: use data.reader=loader"
        )
    if data.pipeline == "device" and not (isinstance(data.augment, str) and data.augment in DEVICE_RECIPES):
        raise ValueError(
            f"data.pipeline=device runs the named recipes {', '.join(DEVICE_RECIPES)} only, not data.augment="
            f"{data.augment!r}: use one of them, or data.pipeline=cpu for a custom list of albumentations ops"
        )
    knn = train.knn_dataset
    if knn is not None and knn.dataset not in LABELED_DATASETS:
        raise ValueError(
            f"train.knn_dataset.dataset={knn.dataset} has no labels; the kNN monitor needs one of "
            f"{', '.join(LABELED_DATASETS)} (or leave train.knn_dataset unset)"
        )
    if knn is not None and knn.dataset in ("imagefolder", "cifar10") and knn.root is None:
        raise ValueError(f"train.knn_dataset.root is required for train.knn_dataset.dataset={knn.dataset}")
    lin = cfg.eval.lincls
    if lin is not None:
        check_labeled(lin.dataset or data, "eval.lincls.dataset" if lin.dataset else "data")
    if train.linear_probe and (not train.knn_every or cfg.knn_data is None):
        raise ValueError(
            "train.linear_probe runs on the kNN monitor's labelled images: set train.knn_every > 0 (and "
            "train.knn_dataset for unlabelled data), or set train.linear_probe=false"
        )
    if moco.momentum_warmup_epochs >= train.epochs:
        raise ValueError(
            f"moco.momentum_warmup_epochs={moco.momentum_warmup_epochs} must be below train.epochs={train.epochs}"
        )
    milestones = train.lr_milestones
    if train.schedule == "step" and any(b <= a for a, b in zip(milestones, milestones[1:])):
        raise ValueError(f"train.lr_milestones={milestones} must be increasing epochs")


def check_timm_arch(model: ModelConfig, image_size: int) -> None:
    """For ``model.arch=timm:<name>``: timm knows the name, a ViT's patch size divides ``data.image_size``, and no
    torchvision-only option is set; raise ValueError naming the field and the fix. Other archs: timm_kwargs unset."""
    if not model.arch.startswith(TIMM_PREFIX):
        if model.timm_kwargs:
            raise ValueError(f"model.timm_kwargs applies to model.arch=timm:<name> only; remove it for {model.arch}")
        return
    if model.cifar_stem:
        raise ValueError(f"model.cifar_stem applies to torchvision ResNets only; set it false for {model.arch}")
    from mocolab.moco.timm_backbones import check_timm_name

    check_timm_name(model.arch.removeprefix(TIMM_PREFIX), image_size, model.timm_kwargs.get("patch_size"))


def check_labeled(data_cfg: DataConfig, where: str) -> None:
    """Raise ValueError unless ``data_cfg`` has labels (``where``: the dotted section, for the message)."""
    if data_cfg.dataset not in LABELED_DATASETS:
        raise ValueError(
            f"{where}.dataset={data_cfg.dataset} has no labels, and linear evaluation needs them: set "
            f"eval.lincls.dataset to a labeled data section ({', '.join(LABELED_DATASETS)}, e.g. "
            "{dataset: imagefolder, root: ...})"
        )


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a.b": value}``; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree["a"]["b"] = value`` for ``dotted="a.b"``, creating sections as needed."""
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is a value, not a section")
        node = child
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"moco.temperature=0.2"`` -> ``("moco.temperature", 0.2)``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set moco.temperature=0.2")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def new_run_name(prefix: str = "moco") -> str:
    """A fresh unique run name: ``moco-20261127-193000-a1b2``."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def absolute_tracking_uri(uri: str, base: Path) -> str:
    """Make a relative ``sqlite:///x.db`` absolute against ``base``; other URIs are returned unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((base / uri[len(prefix) :]).resolve())
    return uri


def is_uri(location: Any) -> bool:
    """True for object-store URIs (``s3://``, ``gs://``, ...); False for local/NFS paths and ``file://``."""
    return "://" in str(location) and not str(location).startswith("file://")


def _as_text(v: Any) -> Any:
    """A ``pathlib.Path`` given for a location field, as text (locations are strings: URIs stay as given)."""
    return str(v) if isinstance(v, os.PathLike) else v


def _names_a_location(v: str | None) -> str | None:
    scheme, sep, rest = (v or "").partition("://")
    if sep and is_uri(v) and not rest.strip("/"):
        raise ValueError(f"{v} names no bucket; use {scheme}://BUCKET/prefix")
    return v


def _absolute(path: Any, base: Path) -> Any:
    if path in (None, ""):
        return path
    text = str(path)
    if "://" in text:  # a URI stays exactly as given (file:// included)
        return text
    p = Path(os.path.expanduser(text))
    return str(p if p.is_absolute() else (base / p).resolve())


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Make the config's paths absolute against ``base`` (in place, on the raw dict)."""
    model = raw.get("model") or {}
    if isinstance(model, dict) and "init_weights" in model:
        model["init_weights"] = _absolute(model["init_weights"], base)
    data = raw.get("data") or {}
    if isinstance(data, dict) and "root" in data:
        data["root"] = _absolute(data["root"], base)
    knn = (raw.get("train") or {}).get("knn_dataset") if isinstance(raw.get("train"), dict) else None
    if isinstance(knn, dict) and "root" in knn:
        knn["root"] = _absolute(knn["root"], base)
    scaling = raw.get("scaling") or {}
    if isinstance(scaling, dict) and "storage_path" in scaling:
        scaling["storage_path"] = _absolute(scaling["storage_path"], base)
    ev = raw.get("eval") or {}
    if isinstance(ev, dict):
        lin = ev.get("lincls") or {}
        if isinstance(lin, dict) and isinstance(lin.get("dataset"), dict) and "root" in lin["dataset"]:
            lin["dataset"]["root"] = _absolute(lin["dataset"]["root"], base)
        det = ev.get("detection") or {}
        if isinstance(det, dict) and isinstance(det.get("data"), dict):
            for key in ("root", "train_json", "val_json"):
                if key in det["data"]:
                    det["data"][key] = _absolute(det["data"][key], base)


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: ``moco.temperature: ... (fix)``."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown key '{loc}'; remove it or check its spelling against experiments/ and the README"
        elif e["type"] == "list_type" and isinstance(e.get("input"), dict):  # --set a.list.0=x made a section
            msg = f"{loc} is a list: set it whole, e.g. --set '{loc}=[...]' (got {e['input']!r})"
        elif e["type"] == "literal_error":
            msg = f"{loc}: {msg} (got {e.get('input')!r})"
        elif loc and not msg.startswith(loc.split(".")[-1]) and loc not in msg:
            msg = f"{loc}: {msg} (got {e.get('input')!r})"
        lines.append(msg)
    return "invalid config:\n  " + "\n  ".join(lines)


def build_config(raw: dict[str, Any], base: Path | None = None) -> Config:
    """Validate a raw dict into a Config: paths absolute against ``base`` (default: cwd),
    a fresh run name if none is given, the tracking URI resolved. Raises ConfigError."""
    base = Path.cwd() if base is None else base
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy with plain types
    _resolve_paths(raw, base)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None
    if not cfg.tracking.run_name:
        cfg.tracking.run_name = new_run_name()
    cfg.tracking.tracking_uri = absolute_tracking_uri(cfg.tracking.tracking_uri or default_tracking_uri(), base)
    cfg.scaling.storage_path = _absolute(cfg.scaling.storage_path, base)  # also the default "ray_results"
    return cfg


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file holds; ConfigError naming the file if it cannot be one."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give a YAML file (e.g. experiments/pretrain/*.yaml)")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read ({err.strerror}); check its permissions") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (moco:, model:, data:, ...)")
    return raw


def load_config(path: str | Path | None = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Load a YAML config (or the defaults), apply ``--set KEY=VALUE`` overrides, validate.

    Relative paths in the file and in overrides resolve against the current directory."""
    raw = read_yaml(path) if path is not None else {}
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(raw, key, value)
    return build_config(raw)
