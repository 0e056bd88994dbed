"""The pre-flight checks of data: folders, splits and counts, object-store roots, the pretraining set against the
batch and the mechanism, the kNN monitor's and the evaluations' datasets."""

from __future__ import annotations

import os
from pathlib import Path

from mocolab.config import LABELED_DATASETS, Config, ConfigError, check_labeled, is_uri
from mocolab.preflight.report import PreflightReport, data_key, user_error


def repeated_folder(folder: Path) -> tuple[Path, Path] | None:
    """``(path, folder it is)`` for the first folder under ``folder`` reached a second time when symbolic links
    are followed (as torchvision's ImageFolder walks): a link loop, which would send the walk round and round, or
    a second link to one folder, which would count its images twice. None if there is none."""
    seen: set[str] = set()
    for dirpath, dirnames, _ in os.walk(folder, followlinks=True):
        dirnames.sort()  # walk in name order: the same link is named on every filesystem
        real = os.path.realpath(dirpath)
        if real in seen:
            return Path(dirpath), Path(real)
        seen.add(real)
    return None


STORE_FIX = (
    "set AWS_ENDPOINT_URL (an S3-compatible store), AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, "
    "or give the node a role) and AWS_DEFAULT_REGION in the environment of the driver and the workers"
)


def _check_object_root(data_cfg, where: str) -> None:
    """An object-store root: the store answers the listing (the one the workers read) and holds images."""
    from mocolab.data.sources import object_images

    root = data_cfg.root
    try:
        found = object_images(root) if data_cfg.dataset != "cifar10" else ("batches",)
    except OSError as err:  # pyarrow: no endpoint, refused connection, bad credentials, no such bucket
        reason = str(err).split(" (Request ID")[0]
        raise ConfigError(f"{where}.root={root}: cannot list the object store ({reason}); {STORE_FIX}") from None
    if not found:
        raise ConfigError(
            f"{where}.root={root}: no images under it; upload the dataset there (e.g. aws s3 sync DIR {root}) "
            "or fix the prefix"
        )


def check_data_section(data_cfg, where: str) -> tuple[int, int]:
    """Root and split folders, and the number of (train, test) images; ConfigError naming ``where``. An
    object-store root is checked by its object listing, the same one the workers read."""
    from mocolab.data.sources import dataset_size

    if data_cfg.root is not None and is_uri(data_cfg.root):
        _check_object_root(data_cfg, where)
    elif data_cfg.root is not None and not Path(data_cfg.root).is_dir():
        raise ConfigError(f"{where}.root={data_cfg.root} does not exist or is not a folder; fix the path")
    if data_cfg.dataset == "imagefolder" and not is_uri(data_cfg.root):
        for split in (data_cfg.train_split, data_cfg.test_split):
            found = repeated_folder(Path(data_cfg.root) / split)
            if found is not None:
                raise ConfigError(
                    f"{where}.root={data_cfg.root}: {found[0]} is {found[1]} again (a symbolic link loop or a second "
                    "link to one folder); remove the link"
                )
    try:
        test = dataset_size(data_cfg, "test") if data_cfg.dataset in LABELED_DATASETS else 0
        return dataset_size(data_cfg, "train"), test
    except ValueError as err:
        raise user_error(where, err) from None


def check_pretrain(cfg: Config, report: PreflightReport) -> None:
    from mocolab.data.augment import check_policy
    from mocolab.moco.mechanisms import mechanism_class
    from mocolab.moco.mechanisms.base import DictionarySettings

    key = data_key(cfg)
    if key not in report.train_images:
        try:
            check_policy(cfg.data.augment, cfg.data.image_size)
        except ValueError as err:
            raise user_error("data.augment", err) from None
        report.train_images[key], report.test_images[key] = check_data_section(cfg.data, "data")
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
    if (
        cfg.model.init_weights is not None
        and (key := f"{cfg.model.init_weights}{cfg.model}") not in report.init_weights
    ):
        from mocolab.weights_io.arch import load_checked

        found = load_checked(
            cfg.model.init_weights, cfg.model, f"model.init_weights={cfg.model.init_weights}", cfg.data.image_size
        )
        report.init_weights[key] = found.summary()
    _check_knn(cfg, report)


KNN_OFF_NOTE = (
    "kNN monitor off: data.dataset=folder has no labels; set train.knn_dataset to a labeled data section "
    "(e.g. {dataset: imagefolder, root: ...}) to turn it on"
)


def single_class_problem(data_cfg, where: str, purpose: str) -> str | None:
    """A line saying that the labeled section ``where`` has a single class (which makes ``purpose``'s accuracy
    meaningless: every prediction is right), or None when it has two or more."""
    from mocolab.data.sources import num_classes

    count = num_classes(data_cfg)
    if count >= 2:
        return None
    return (
        f"{where}.root={data_cfg.root} has {count} class folder under {data_cfg.train_split}/, so {purpose} "
        "accuracy is meaningless (every prediction is right); give a labeled dataset with two or more classes"
    )


def _check_knn(cfg: Config, report: PreflightReport) -> None:
    """The kNN monitor's own labeled data (``train.knn_dataset``), or a note, once, that it is off; a note when its
    data has a single class."""
    if not cfg.train.knn_every:
        return
    if cfg.knn_data is None:
        if KNN_OFF_NOTE not in report.notes:
            report.notes.append(KNN_OFF_NOTE)
        return
    where = "data" if cfg.train.knn_dataset is None else "train.knn_dataset"
    if cfg.train.knn_dataset is not None and (key := "knn" + cfg.train.knn_dataset.model_dump_json()) not in (
        report.checked
    ):
        check_data_section(cfg.train.knn_dataset, "train.knn_dataset")
        report.checked.add(key)
    if cfg.knn_data.dataset == "imagefolder":
        problem = single_class_problem(cfg.knn_data, where, "the kNN monitor's")
        note = f"{problem} (or set train.knn_every=0)" if problem else None
        if note and note not in report.notes:
            report.notes.append(note)


def lincls_key(cfg: Config) -> str:
    from mocolab.evaluate.lincls import dataset_config

    return dataset_config(cfg).model_dump_json()


def check_lincls(cfg: Config) -> None:
    from mocolab.data.augment import check_policy
    from mocolab.evaluate.lincls import dataset_config

    data_cfg = dataset_config(cfg)
    where = "eval.lincls.dataset" if cfg.eval.lincls and cfg.eval.lincls.dataset else "data"
    try:
        check_labeled(data_cfg, where)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    try:
        check_policy("none", data_cfg.image_size)
    except ValueError as err:
        raise user_error(f"{where}.image_size", err) from None
    check_data_section(data_cfg, where)
    if data_cfg.dataset == "imagefolder" and (problem := single_class_problem(data_cfg, where, "linear")):
        raise ConfigError(problem)


def check_detection(cfg: Config, model_cfg, report: PreflightReport) -> None:
    from mocolab.data.detection import read_detection_splits
    from mocolab.evaluate.detection import check_detection

    det = cfg.eval.detection
    if det is None:
        raise ConfigError("the config has no eval.detection section; add one (see experiments/eval/)")
    check_detection(cfg, model_cfg, det)
    try:
        train, val, classes = read_detection_splits(det.data)  # reads (and makes, for made_digits) the data
    except ValueError as err:
        raise user_error("eval.detection.data", err) from None
    report.detection.append(f"{len(train)} train / {len(val)} val images, classes {classes}")
