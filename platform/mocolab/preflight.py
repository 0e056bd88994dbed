"""The pre-flight step: every check that needs more than the config itself, run once by the driver.

``mocolab.config`` holds the pure rules (types, ranges, fields that must agree). What needs the filesystem,
the dataset or a library is checked here, once per command and before any Ray worker starts or any MLflow run
is created: data folders and split/class layout, the training-set size against the batch and the mechanism
(e.g. the memory bank's K), the augmentation policy (albumentations), the evaluation datasets, the storage path
and the tracking store. Workers trust the driver and re-run none of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Union

from mocolab.config import Config, ConfigError

STAGES = ("pretrain", "lincls", "detection")


@dataclass
class PreflightReport:
    """What the checks counted, per distinct data section: training and test images."""

    train_images: dict[str, int] = field(default_factory=dict)
    test_images: dict[str, int] = field(default_factory=dict)
    detection: list[str] = field(default_factory=list)  # "N train / M val images, classes [...]"

    def summary(self) -> str:
        parts = [f"{n:,} training images" for n in self.train_images.values()]
        parts += [f"detection: {text}" for text in self.detection]
        return f"[mocolab] pre-flight checks passed ({'; '.join(parts) or 'data, storage, tracking'})"


def _user_error(where: str, err: Exception) -> ConfigError:
    text = str(err)
    return ConfigError(text if where in text else f"{where}: {text}")


def _data_key(cfg: Config) -> str:
    return cfg.data.model_dump_json()


def _check_data_section(data_cfg, where: str) -> tuple[int, int]:
    """Root and split folders, and the number of (train, test) images; ConfigError naming ``where``."""
    from mocolab.data.datasets import dataset_size

    if data_cfg.root is not None and not data_cfg.root.is_dir():
        raise ConfigError(f"{where}.root={data_cfg.root} does not exist or is not a folder; fix the path")
    try:
        return dataset_size(data_cfg, "train"), dataset_size(data_cfg, "test")
    except ValueError as err:
        raise _user_error(where, err) from None


def _check_pretrain(cfg: Config, report: PreflightReport) -> None:
    from mocolab.data.augment import check_policy
    from mocolab.moco.mechanisms import mechanism_class
    from mocolab.moco.mechanisms.base import DictionarySettings

    key = _data_key(cfg)
    if key not in report.train_images:
        try:
            check_policy(cfg.data.augment, cfg.data.image_size)
        except ValueError as err:
            raise _user_error("data.augment", err) from None
        report.train_images[key], report.test_images[key] = _check_data_section(cfg.data, "data")
    n_train = report.train_images[key]
    if n_train < cfg.global_batch:
        raise ConfigError(
            f"{n_train} training images are fewer than one global batch of {cfg.global_batch} "
            "(train.batch_size x scaling.num_workers); lower train.batch_size or raise data.limit_train"
        )
    try:
        mechanism_class(cfg.moco.mechanism).check(DictionarySettings.from_config(cfg, n_train))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _lincls_key(cfg: Config) -> str:
    from mocolab.evaluate.lincls import dataset_config

    return dataset_config(cfg).model_dump_json()


def _check_lincls(cfg: Config) -> None:
    from mocolab.data.augment import check_policy
    from mocolab.evaluate.lincls import dataset_config

    data_cfg = dataset_config(cfg)
    where = "eval.lincls.dataset" if cfg.eval.lincls and cfg.eval.lincls.dataset else "data"
    try:
        check_policy("none", data_cfg.image_size)
    except ValueError as err:
        raise _user_error(f"{where}.image_size", err) from None
    _check_data_section(data_cfg, where)


def _check_detection(cfg: Config, model_cfg, report: PreflightReport) -> None:
    from mocolab.data.detection import read_detection_splits
    from mocolab.evaluate.detection import check_detection

    det = cfg.eval.detection
    if det is None:
        raise ConfigError("the config has no eval.detection section; add one (see experiments/eval/)")
    check_detection(cfg, model_cfg, det)
    try:
        train, val, classes = read_detection_splits(det.data)  # reads (and makes, for made_digits) the data
    except ValueError as err:
        raise _user_error("eval.detection.data", err) from None
    report.detection.append(f"{len(train)} train / {len(val)} val images, classes {classes}")


def _check_source(source) -> None:
    """The evaluated backbone's weights load into ``model.arch`` (strictly), here rather than in a worker."""
    from mocolab.evaluate.weights import load_backbone_state
    from mocolab.moco.backbones import build_backbone

    backbone, _ = build_backbone(source.model.model_copy(update={"bn": "plain", "channels_last": False}))
    load_backbone_state(backbone, source)


def preflight(
    configs: Union[Config, Sequence[Config]],
    stages: Iterable[str] = ("pretrain",),
    source=None,
    quiet: bool = False,
) -> PreflightReport:
    """Run the driver-side checks of ``configs`` (one run, or every trial of a sweep) for ``stages``
    (``pretrain`` and/or the evaluations ``lincls``, ``detection``), then of their storage paths and tracking
    stores. ``source``: the evaluated backbone (:class:`mocolab.evaluate.weights.BackboneSource`) of an
    evaluation command, whose weights must fit its ``model.arch``. Raises ConfigError naming the field or file
    and the fix; prints one line when every check passed (unless ``quiet``)."""
    from mocolab import tracking
    from mocolab.storage import check_storage_path

    configs = [configs] if isinstance(configs, Config) else list(configs)
    stages = tuple(stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"preflight: unknown stage(s) {unknown}; choose from {STAGES}")
    report = PreflightReport()
    done: set[str] = set()  # evaluation sections already checked (a sweep's trials share them)
    for cfg in configs:
        if "pretrain" in stages:
            _check_pretrain(cfg, report)
        if "lincls" in stages and (key := "lincls" + _lincls_key(cfg)) not in done:
            _check_lincls(cfg)
            done.add(key)
        model_cfg = source.model if source is not None else cfg.model
        if "detection" in stages and (key := f"det{cfg.eval.detection}{model_cfg}") not in done:
            _check_detection(cfg, model_cfg, report)
            done.add(key)
    if source is not None:
        _check_source(source)
    for storage in sorted({cfg.scaling.storage_path for cfg in configs}):
        check_storage_path(storage)
    for uri in sorted({cfg.tracking.tracking_uri for cfg in configs}):
        tracking.check_reachable(uri)
    if not quiet:
        print(report.summary(), flush=True)
    return report


def configured_stages(cfg: Config, pretrain: bool = True) -> tuple[str, ...]:
    """The stages a run of ``cfg`` goes through: pretraining, then the evaluations its ``eval`` section names."""
    stages = ("pretrain",) if pretrain else ()
    return stages + tuple(name for name in ("lincls", "detection") if getattr(cfg.eval, name) is not None)
