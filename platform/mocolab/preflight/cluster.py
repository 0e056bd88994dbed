"""The pre-flight checks of where the workers run: a local Ray that could never hold them, and on a cluster, what
each worker node sees of the data."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from mocolab.config import Config, ConfigError
from mocolab.preflight.data import check_data_section
from mocolab.preflight.report import PreflightReport, data_key

WORKER_PROBE_TIMEOUT_S = 120.0
"""How long the pre-flight step waits for a worker node to report what it sees of the data."""


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


def check_capacity(configs: Sequence[Config], stages: Sequence[str], concurrent: int) -> None:
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
        return check_data_section(data_cfg, where)
    except ConfigError as err:
        return str(err)


NO_WORKER_NODE_NOTE = (
    "no worker node is up yet (the cluster may add them on demand): the data was checked from the driver only; "
    "a local or NFS data.root must be mounted at the same path on every worker node"
)


def check_on_worker_nodes(configs: Sequence[Config], stages: Sequence[str], report: PreflightReport) -> None:
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
            driver = (report.train_images.get(data_key(cfg)), report.test_images.get(data_key(cfg)))
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
