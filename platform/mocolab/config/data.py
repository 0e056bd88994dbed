"""The ``data`` section (also the kNN monitor's and linear evaluation's labeled data)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mocolab.config.base import _as_text, _names_a_location, _Section

DIGIT_SIDE = 8  # scikit-learn's bundled digits are 8 x 8


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
