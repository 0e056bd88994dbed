"""The ``train``, ``scaling`` and ``tracking`` sections of a pretraining run."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from mocolab.config.base import SAFE_NAME, _Section
from mocolab.config.data import DataConfig


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
