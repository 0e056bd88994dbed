"""The pre-flight step: every check that needs more than the config itself, run once by the driver.

``mocolab.config`` holds the pure rules (types, ranges, fields that must agree). What needs the filesystem,
the dataset or a library is checked here, once per command and before any Ray worker starts or any MLflow run
is created: data folders and split/class layout (no symbolic link loops), the training-set size against the batch
and the mechanism (e.g. the memory bank's K), the augmentation policy (albumentations), the evaluation datasets,
the workers against what a local Ray can ever hold, the storage path and the tracking store. Workers trust the
driver and re-run none of it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mocolab.config import LABELED_DATASETS, Config, ConfigError, check_labeled, is_uri

STAGES = ("pretrain", "lincls", "detection")
WORKER_PROBE_TIMEOUT_S = 120.0
"""How long the pre-flight step waits for a worker node to report what it sees of the data."""


@dataclass
class PreflightReport:
    """What the checks counted, per distinct data section: training and test images."""

    train_images: dict[str, int] = field(default_factory=dict)
    test_images: dict[str, int] = field(default_factory=dict)
    detection: list[str] = field(default_factory=list)  # "N train / M val images, classes [...]"
    init_weights: dict[str, str] = field(default_factory=dict)  # model.init_weights file -> its layout summary
    checked: set[str] = field(default_factory=set)  # evaluation data sections already checked
    notes: list[str] = field(default_factory=list)  # things the user should know once, e.g. the kNN monitor is off

    def summary(self) -> str:
        parts = [f"{n:,} training images" for n in self.train_images.values()]
        parts += [f"detection: {text}" for text in self.detection]
        parts += [f"model.init_weights {layout}" for layout in self.init_weights.values()]
        lines = [f"[mocolab] pre-flight checks passed ({'; '.join(parts) or 'data, storage, tracking'})"]
        return "\n".join(lines + [f"[mocolab] {note}" for note in self.notes])


def _user_error(where: str, err: Exception) -> ConfigError:
    text = str(err)
    return ConfigError(text if where in text else f"{where}: {text}")


def _data_key(cfg: Config) -> str:
    return cfg.data.model_dump_json()


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
    from mocolab.data.datasets import object_images

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


def _check_data_section(data_cfg, where: str) -> tuple[int, int]:
    """Root and split folders, and the number of (train, test) images; ConfigError naming ``where``. An
    object-store root is checked by its object listing, the same one the workers read."""
    from mocolab.data.datasets import dataset_size

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
    from mocolab.data.datasets import num_classes

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
        _check_data_section(cfg.train.knn_dataset, "train.knn_dataset")
        report.checked.add(key)
    if cfg.knn_data.dataset == "imagefolder":
        problem = single_class_problem(cfg.knn_data, where, "the kNN monitor's")
        note = f"{problem} (or set train.knn_every=0)" if problem else None
        if note and note not in report.notes:
            report.notes.append(note)


def _lincls_key(cfg: Config) -> str:
    from mocolab.evaluate.lincls import dataset_config

    return dataset_config(cfg).model_dump_json()


def _check_lincls(cfg: Config) -> None:
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
        raise _user_error(f"{where}.image_size", err) from None
    _check_data_section(data_cfg, where)
    if data_cfg.dataset == "imagefolder" and (problem := single_class_problem(data_cfg, where, "linear")):
        raise ConfigError(problem)


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


def stage_workers(cfg: Config, stages: Iterable[str]) -> dict[str, int]:
    """The Ray Train workers each stage of a run of ``cfg`` asks for, by the field that sets them."""
    lincls = cfg.eval.lincls.num_workers if cfg.eval.lincls is not None else 1  # LinclsConfig's default
    counts = {
        "pretrain": ("scaling.num_workers", cfg.scaling.num_workers),
        "lincls": ("eval.lincls.num_workers", lincls),
    }
    if cfg.eval.detection is not None:
        counts["detection"] = ("eval.detection.num_workers", cfg.eval.detection.num_workers)
    return dict(counts[stage] for stage in stages if stage in counts)


RESOURCE_FIELDS = {"CPU": "scaling.cpus_per_worker", "GPU": "scaling.use_gpu"}


def capacity_shortfall(
    workers: dict[str, int], per_worker: dict[str, float], available: dict[str, float], concurrent: int = 1
) -> str | None:
    """Why ``concurrent`` runs of the largest stage in ``workers`` (field -> count), each worker asking for
    ``per_worker`` (resource -> amount), can never start on ``available``, or None if they fit. Pure."""
    from mocolab.runtime import describe

    field_name, count = max(workers.items(), key=lambda item: item[1])
    for name, amount in per_worker.items():
        have = available.get(name, 0.0)
        if concurrent * count * amount <= have:
            continue
        source = RESOURCE_FIELDS.get(name, f"scaling.resources_per_worker.{name}")
        if concurrent > 1:
            need = f"max_concurrent_trials={concurrent} trials at once x {field_name}={count} workers"
            fix = f"lower max_concurrent_trials (at most {int(have // (count * amount))} here) or the trial's resources"
        else:
            need, most = f"{field_name}={count} workers", int(have // amount)
            fix = f"lower {field_name} (at most {most} here) or {source}" if most else f"change {source}"
        return (
            f"{need} x {amount:g} {name} each ({source}) need {concurrent * count * amount:g} {name}, but the "
            f"local Ray has {describe(available)} and would wait for them forever; {fix}, or join a cluster that "
            "has them (RAY_ADDRESS)"
        )
    return None


def _check_capacity(configs: Sequence[Config], stages: Sequence[str], concurrent: int) -> None:
    """A local Ray (no ``RAY_ADDRESS``) can never grow: refuse workers it cannot hold rather than wait forever.
    (A cluster may autoscale: ``runtime.fit`` waits at most ``scaling.start_timeout_s`` there.)"""
    from mocolab.runtime import local_resources, uses_cluster, worker_resources

    if uses_cluster():
        return
    available = local_resources()
    for cfg in configs:
        workers = stage_workers(cfg, stages)
        if workers and (problem := capacity_shortfall(workers, worker_resources(cfg.scaling), available, concurrent)):
            raise ConfigError(problem)
        if "pretrain" in stages and (problem := stream_cpu_shortfall(cfg, available.get("CPU", 0.0), concurrent)):
            raise ConfigError(problem)


def stream_cpu_shortfall(cfg: Config, cpus: float, concurrent: int = 1) -> str | None:
    """Why ``data.reader=stream``'s decode tasks (``data.stream_cpus`` each) could never start beside the training
    workers on a local Ray of ``cpus`` CPUs, or None. Pure."""
    data, scaling = cfg.data, cfg.scaling
    held = concurrent * scaling.num_workers * scaling.cpus_per_worker
    if data.reader != "stream" or data.stream_cpus == 0 or held + data.stream_cpus <= cpus:
        return None
    return (
        f"data.stream_cpus={data.stream_cpus:g}: the training workers hold {held:g} of the local Ray's {cpus:g} CPUs, "
        "so Ray Data's decode tasks could never start; set data.stream_cpus=0 (decode beside the workers) or lower "
        "scaling.num_workers / scaling.cpus_per_worker"
    )


def _data_sections(cfg: Config, stages: Sequence[str]) -> list[tuple[str, object]]:
    """``(field, data section)`` of every dataset the workers of ``stages`` read from files (made data excluded)."""
    from mocolab.evaluate.lincls import dataset_config

    sections = []
    if "pretrain" in stages:
        sections.append(("data", cfg.data))
        if cfg.train.knn_every and cfg.train.knn_dataset is not None:
            sections.append(("train.knn_dataset", cfg.train.knn_dataset))
    if "lincls" in stages:
        where = "eval.lincls.dataset" if cfg.eval.lincls and cfg.eval.lincls.dataset else "data"
        sections.append((where, dataset_config(cfg)))
    return [(where, data_cfg) for where, data_cfg in sections if data_cfg.root is not None]


def _worker_view(data_cfg, where: str) -> tuple[int, int] | str:
    """Run on a worker node: the section's (train, test) image counts as that node sees them, or why it cannot."""
    try:
        return _check_data_section(data_cfg, where)
    except ConfigError as err:
        return str(err)


NO_WORKER_NODE_NOTE = (
    "no worker node is up yet (the cluster may add them on demand): the data was checked from the driver only; "
    "a local or NFS data.root must be mounted at the same path on every worker node"
)


def _check_on_worker_nodes(configs: Sequence[Config], stages: Sequence[str], report: PreflightReport) -> None:
    """On a cluster, the workers' filesystem is not the driver's: every data section is checked again on each live
    node that could hold a worker (same mount, same credentials and endpoint as the workers), and every node must
    see what the driver counted."""
    import json

    from ray.exceptions import GetTimeoutError

    from mocolab.runtime import ensure_ray, run_on_worker_nodes, worker_resources

    ensure_ray()
    probed: set[str] = set()
    for cfg in configs:
        per_worker = worker_resources(cfg.scaling)
        for where, data_cfg in _data_sections(cfg, stages):
            if (key := data_cfg.model_dump_json() + json.dumps(per_worker, sort_keys=True)) in probed:
                continue
            probed.add(key)
            try:
                views = run_on_worker_nodes(_worker_view, (data_cfg, where), per_worker, WORKER_PROBE_TIMEOUT_S)
            except GetTimeoutError:
                raise ConfigError(
                    f"a worker node did not report what it sees of {where}.root={data_cfg.root} within "
                    f"{WORKER_PROBE_TIMEOUT_S:.0f} s; check the cluster's nodes (ray status), then run again"
                ) from None
            if not views and NO_WORKER_NODE_NOTE not in report.notes:
                report.notes.append(NO_WORKER_NODE_NOTE)
            driver = (report.train_images.get(_data_key(cfg)), report.test_images.get(_data_key(cfg)))
            for node, view in views.items():
                if isinstance(view, str):
                    raise ConfigError(
                        f"worker node {node}: {view} (the driver sees it; mount the same storage at the same path on "
                        "every node, or give the node the same access to the bucket)"
                    )
                if where == "data" and driver[0] is not None and tuple(view) != driver:
                    raise ConfigError(
                        f"data.root={data_cfg.root}: worker node {node} sees {view[0]:,} training / {view[1]:,} test "
                        f"images, the driver {driver[0]:,} / {driver[1]:,}; mount the same storage on every node"
                    )


def _check_source(source) -> None:
    """The evaluated backbone's weights fit ``model.arch`` (strictly), here rather than in a worker."""
    from mocolab.evaluate.weights import check_source

    check_source(source)


def preflight(
    configs: Config | Sequence[Config],
    stages: Iterable[str] = ("pretrain",),
    source=None,
    quiet: bool = False,
    concurrent: int = 1,
) -> PreflightReport:
    """Run the driver-side checks of ``configs`` (one run, or every trial of a sweep) for ``stages``
    (``pretrain`` and/or the evaluations ``lincls``, ``detection``), then of the workers against a local Ray
    (``concurrent`` runs at once: a sweep's trials), their storage paths and tracking stores. ``source``: the
    evaluated backbone (:class:`mocolab.evaluate.weights.BackboneSource`) of an evaluation command, whose weights
    must fit its ``model.arch``. Raises ConfigError naming the field or file and the fix; prints one line when
    every check passed (unless ``quiet``)."""
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
    _check_capacity(configs, stages, concurrent)
    from mocolab.runtime import uses_cluster

    if uses_cluster():
        _check_on_worker_nodes(configs, stages, report)
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
