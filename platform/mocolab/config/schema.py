"""The root of the schema: :class:`Config`, a pretraining run (its sections and derived values), and the rules
across its fields, which are pure: no files, no dataset, no albumentations."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import Field, model_validator

from mocolab.config.base import TIMM_PREFIX, _Section, flatten
from mocolab.config.data import DEVICE_RECIPES, LABELED_DATASETS, DataConfig
from mocolab.config.evaluation import EvalConfig
from mocolab.config.model import MocoConfig, ModelConfig
from mocolab.config.presets import apply_preset
from mocolab.config.training import ScalingConfig, TrackingConfig, TrainConfig


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
