"""MLflow at the edge: run names, tags, run linking, resume into the same run, artifacts.

Everything that knows an MLflow name lives here, so pretraining, evaluations, sweeps and the
analysis agree on them (see platform/ARCHITECTURE.md).
"""

from __future__ import annotations

import getpass
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mocolab import compute
from mocolab.config import Config, ConfigError

if TYPE_CHECKING:  # mlflow is imported where it is used: the names below import without it
    from mlflow import MlflowClient
    from mlflow.entities import Run

# --- tags -------------------------------------------------------------------------------------------
STAGE_TAG = "mocolab.stage"  # one of the STAGE_* values
STAGE_PRETRAIN, STAGE_LINCLS, STAGE_DETECTION = "pretrain", "lincls", "detection"
STAGE_SWEEP, STAGE_BENCH, STAGE_REPRODUCE = "sweep", "bench", "reproduce"
PRETRAIN_RUN_TAG = "mocolab.pretrain_run_id"  # on an evaluation run: the pretraining run it evaluates
INIT_TAG = "mocolab.init"  # random | supervised | file | pretrain
SWEEP_TAG = "mocolab.sweep"  # on a sweep's parent run and its trials
SWEEP_AXES_TAG = "mocolab.sweep_axes"  # on a sweep's parent run: the swept keys, comma-separated
TRIAL_ID_TAG = "mocolab.trial_id"  # Ray Tune's trial id of a sweep trial
STOPPED_EARLY_TAG = "mocolab.stopped_early"  # a trial the scheduler (ASHA) stopped
GIT_COMMIT_TAG = "mocolab.git_commit"
NONFINITE_LOSS_TAG = "mocolab.nonfinite_loss"  # set by rank 0 when the loss became NaN/inf: where it happened
RESUME_FALLBACK_TAG = "mocolab.resume_fallback"  # set by rank 0 when it resumed from an older checkpoint: why
NO_LOADABLE_CHECKPOINT_TAG = "mocolab.no_loadable_checkpoint"  # set by rank 0 when no checkpoint of the run loads
PARENT_RUN_TAG = "mlflow.parentRunId"
CLAIM_TAG = "mocolab.claim"  # mocolab reproduce: on each claim's sweep run (a child of the stage=reproduce run)
VERDICT_TAG = "mocolab.verdict"  # reproduced | not_reproduced | inconclusive, on each claim's sweep run

# --- MLflow's own names that mocolab fills (the UI's runs table shows them) ---------------------------
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # on an experiment
MODEL_TRAINING_KIND = "custom_model_development"  # without a kind, MLflow 3's UI opens a GenAI trace view
SOURCE_NAME_TAG, SOURCE_TYPE_TAG = "mlflow.source.name", "mlflow.source.type"  # `mocolab <subcommand>`
COMMAND_TAG = "mocolab.command"  # the whole command line that made the run, credentials masked
SOURCE_GIT_COMMIT_TAG = "mlflow.source.git.commit"
USER_TAG = "mlflow.user"
DATASET_CONTEXT_TAG, TRAINING_CONTEXT = "mlflow.data.context", "training"  # on a run's dataset input
BACKBONE_MODEL = "backbone"  # the logged model of a pretraining run (its final backbone)
DRIVER_TAG = "mocolab.driver"  # on a pretraining run: host:pid:start of the process driving it (see driver_state)

# --- metrics ------------------------------------------------------------------------------------------
LOSS, LR, KNN_TOP1 = "loss", "lr", "knn_top1"  # per epoch (step = epoch)
EPOCH_TIME, THROUGHPUT, CORRUPT_SKIPPED = "epoch_time_s", "throughput_img_s", "corrupt_skipped"
LINCLS_METRICS = ("lincls_top1", "lincls_top5")
LINCLS_FAST_METRICS = ("lincls_fast_top1", "lincls_fast_top5")
LINEAR_PROBE_TIME = "linear_probe_time_s"  # train.linear_probe: seconds of the probe after the last epoch
DETECTION_METRICS = ("det_AP", "det_AP50", "det_AP75")
DOWNSTREAM_METRICS = {STAGE_LINCLS: LINCLS_METRICS + LINCLS_FAST_METRICS, STAGE_DETECTION: DETECTION_METRICS}
"""Headline metrics of each evaluation stage, copied onto the pretraining run."""
HEADLINE_METRICS = (KNN_TOP1, "lincls_top1", "lincls_fast_top1", "lincls_top5", *DETECTION_METRICS)
"""What reports tabulate by default, first = primary."""
WORKER_SECONDS, DEVICE_HOURS, COST = "worker_seconds", "device_hours", "cost"
"""Compute accounting (``mocolab/compute.py``), step 0, on every pretraining and evaluation run at the end of each
attempt (totals over its attempts) and on a sweep's parent run (totals over its trials and their evaluations);
``cost`` only with ``tracking.price_per_device_hour``."""

# --- artifacts ----------------------------------------------------------------------------------------
CONFIG_ARTIFACT = "config.yaml"
BACKBONE_ARTIFACT = "backbone.pt"
SWEEP_ARTIFACT = "sweep.yaml"  # on a sweep's parent run
BASE_ARTIFACT = "base_config.yaml"  # on a sweep's parent run
REPORT_ARTIFACT_DIR = "report"  # mocolab report's files on a sweep's parent run

MAX_PARAM_CHARS = 6000
SQLITE_HEADER = b"SQLite format 3\x00"
MAX_TAG_CHARS = 8000  # MLflow refuses longer tag values
_SECRET_ENV = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD)$")
_URI_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")


class RunFinishedError(ConfigError):
    """A run of this name already finished: resuming it would mix two runs."""


def redact(value: str) -> str:
    """Remove credentials from a value before it is logged: ``user:pw@`` in URIs and the values
    of environment variables named ``*KEY``, ``*SECRET``, ``*TOKEN``, ``*PASSWORD``."""
    value = _URI_CREDENTIALS.sub("***@", value)
    for name, secret in os.environ.items():
        if _SECRET_ENV.search(name.upper()) and len(secret) >= 4 and secret in value:
            value = value.replace(secret, "***")
    return value


def redact_tree(tree: Any) -> Any:
    """:func:`redact` applied to every string of a nested dict/list, e.g. a config dump."""
    if isinstance(tree, str):
        return redact(tree)
    if isinstance(tree, dict):
        return {key: redact_tree(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [redact_tree(value) for value in tree]
    return tree


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, naming the URI (credentials masked), when the tracking store cannot be used: a server that
    does not answer ``/health`` within ``timeout_s``, a PostgreSQL database that refuses a connection (clients may
    use one directly), a sqlite file in a missing or read-only folder or that is not a database, a plain folder
    (MLflow 3's refused file store)."""
    fix = "set tracking.tracking_uri / MLFLOW_TRACKING_URI to a reachable server or sqlite:///PATH"
    if uri.split("://", 1)[0].split("+", 1)[0] == "postgresql":
        _check_postgres(uri, timeout_s, fix)
    elif uri.startswith(("http://", "https://")):
        health = _URI_CREDENTIALS.sub("", uri).rstrip("/") + "/health"  # urllib cannot take user:pw@host
        try:
            with urllib.request.urlopen(health, timeout=timeout_s) as resp:
                if resp.status != 200:
                    raise OSError(f"HTTP {resp.status}")
        except (OSError, urllib.error.URLError) as err:
            raise ConfigError(
                f"MLflow tracking server {redact(uri)} is unreachable ({err}); start it or {fix}"
            ) from None
    elif uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
            raise ConfigError(
                f"MLflow store {redact(uri)}: folder {path.parent} does not exist or is not writable; "
                "fix tracking.tracking_uri or MLFLOW_TRACKING_URI"
            )
        if path.is_dir() or (path.is_file() and path.stat().st_size and not _is_sqlite(path)):
            raise ConfigError(f"MLflow store {redact(uri)}: {path} is not a SQLite database; {fix}")
    elif "://" not in uri or uri.startswith("file:"):
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
            raise ConfigError(
                f"MLflow store {redact(uri)} is a plain folder (the file store), which MLflow 3 refuses; "
                f"use sqlite:///{uri.removeprefix('file://').rstrip('/') or '.'}/mlflow.db or {fix}"
            )


def _check_postgres(uri: str, timeout_s: float, fix: str) -> None:
    """Connect and log in as MLflow will (``postgresql[+driver]://user:pw@host:port/db``): the server, the
    credentials and the database must all be right. The reason shown never holds the password."""
    import psycopg

    try:
        psycopg.connect("postgresql://" + uri.split("://", 1)[1], connect_timeout=max(2, round(timeout_s))).close()
    except psycopg.Error as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = lines[0] if lines else type(err).__name__
        password = urllib.parse.urlsplit(uri).password
        for secret in {password, urllib.parse.unquote(password or "")} - {None, ""}:
            reason = reason.replace(secret, "***")
        raise ConfigError(
            f"MLflow store {redact(uri)} is unreachable ({redact(reason)}); start the database, fix the URI or {fix}"
        ) from None


def _is_sqlite(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    except OSError:
        return False


def mlflow_client(uri: str) -> MlflowClient:
    """An MlflowClient on ``uri`` (no reachability check: see :func:`client_for`)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def client_for(uri: str) -> MlflowClient:
    """An MlflowClient on ``uri`` after checking it is reachable."""
    check_reachable(uri)
    return mlflow_client(uri)


def downstream_tag(stage: str) -> str:
    """The tag on a pretraining run naming its evaluation run of ``stage``: ``mocolab.lincls_run_id``."""
    return f"mocolab.{stage}_run_id"


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if missing, tagged as model training (an experiment of an older
    mocolab, without a kind, gets the tag; another kind is left alone)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return exp.experiment_id


def find_run(client: MlflowClient, experiment: str, run_name: str) -> Run | None:
    """The newest run called ``run_name`` in ``experiment``, or None."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    escaped = run_name.replace("'", "\\'")
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"attributes.run_name = '{escaped}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def git_commit() -> str | None:
    """The commit of the checkout mocolab runs from, if it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def command_line() -> str:
    """The mocolab command this process runs (``mocolab pretrain experiments/x.yaml --set ...``), credentials
    removed; plain ``mocolab`` in a process that is not the command line (a Ray worker, a notebook)."""
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    if program.name != "mocolab" and program.parts[-2:] != ("mocolab", "cli.py"):
        return "mocolab"
    return redact(shlex.join(["mocolab", *sys.argv[1:]]))


def source_tags() -> dict[str, str]:
    """MLflow's source tags of a run this process creates: ``mocolab <subcommand>`` (the UI's Source column shows
    the part after the last '/', so not the whole command line, which goes to ``mocolab.command``), the git
    commit, the user."""
    command = command_line()
    tags = {SOURCE_NAME_TAG: " ".join(shlex.split(command)[:2]), SOURCE_TYPE_TAG: "LOCAL", COMMAND_TAG: command}
    commit = git_commit()
    if commit:
        tags[GIT_COMMIT_TAG] = tags[SOURCE_GIT_COMMIT_TAG] = commit
    try:
        tags[USER_TAG] = getpass.getuser()
    except (KeyError, OSError):  # no login name (some containers)
        pass
    return tags


def ui_link(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI of a tracking server (None for other stores), opened on the model-training
    view: MLflow 3.17's UI starts on its GenAI view unless told ``workflowType=machine_learning``."""
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{redact(uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def params_of(cfg: Config, extra: dict[str, Any] | None = None) -> dict[str, str]:
    """The flattened config and ``extra`` params (e.g. the mechanism's, ``moco.mechanisms.run_params``) as MLflow
    params: dotted keys, stringified, credentials removed."""
    flat = cfg.flat() | (extra or {})
    flat.pop("tracking.tracking_uri", None)
    return {k: redact(str(v))[:MAX_PARAM_CHARS] for k, v in flat.items()}


def log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    """Log params in batches (MLflow caps a batch at 100 params)."""
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int, wait: bool = True) -> Any:
    """Log numeric metrics at ``step`` in one call; None values are skipped. With ``wait=False`` the call returns at
    once and MLflow writes in a background thread: the result (``None`` if nothing was logged) has ``wait()``, which
    must be called before the run's metrics are read elsewhere."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
    if batch:
        return client.log_batch(run_id, metrics=batch, synchronous=wait)
    return None


def log_config_artifact(client: MlflowClient, run_id: str, cfg: Config) -> None:
    """Store the resolved config as ``config.yaml`` at the root of the run's artifacts."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CONFIG_ARTIFACT
        path.write_text(yaml.safe_dump(redact_tree(cfg.model_dump(mode="json")), sort_keys=False))
        client.log_artifact(run_id, str(path))


def log_dataset_input(client: MlflowClient, run_id: str, cfg: Config) -> None:
    """Log the training set as the run's dataset input (context ``training``): its name, where it lives (a local
    folder, or the code that makes it), its image count as the profile and a digest of its file list."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    from mocolab.data.sources import summarize

    summary = summarize(cfg.data, "train")
    if summary.root is not None:  # as mlflow.data's local and code dataset sources write themselves
        source_type, source = "local", {"uri": redact(summary.root)}
    else:
        source_type, source = "code", {"tags": {"mocolab.data.dataset": cfg.data.dataset}}
    dataset = Dataset(
        name=summary.name,
        digest=summary.digest,
        source_type=source_type,
        source=json.dumps(source),
        profile=json.dumps({"num_images": summary.num_images}),
    )
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag(DATASET_CONTEXT_TAG, TRAINING_CONTEXT)])])


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (Linux: clock ticks after boot, from /proc), or None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22 of proc(5); fields after "(comm)" start at 3


def driver_id() -> str:
    """This process as the driver of a run: ``host:pid:start`` (the start tells a reused pid apart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_process_start(os.getpid()) or '?'}"


DRIVER_ALIVE, DRIVER_GONE, DRIVER_SELF, DRIVER_UNKNOWN = "alive", "gone", "self", "unknown"


def driver_state(tag: str | None, host: str, own_pid: int, process_start: Callable[[int], str | None]) -> str:
    """Whether the driver recorded in a run's ``DRIVER_TAG`` still runs: ``DRIVER_SELF`` (this process),
    ``DRIVER_ALIVE``, ``DRIVER_GONE`` (no process with that pid and start time on this host), or
    ``DRIVER_UNKNOWN`` (no tag, another host, or no /proc to look in). Pure: ``process_start`` looks."""
    parts = (tag or "").rsplit(":", 2)
    if len(parts) != 3 or parts[0] != host or not parts[1].isdigit() or parts[2] == "?":
        return DRIVER_UNKNOWN
    pid, started = int(parts[1]), parts[2]
    if process_start(pid) != started:
        return DRIVER_GONE
    return DRIVER_SELF if pid == own_pid else DRIVER_ALIVE


def _check_unfinished(run: Run, cfg: Config) -> None:
    """Before resuming an unfinished run: refuse a FINISHED one or one a live driver still runs; say so when
    a RUNNING one was left behind by a driver that is gone (killed, crashed, its machine rebooted)."""
    name, run_id = cfg.tracking.run_name, run.info.run_id
    if run.info.status == "FINISHED":
        raise RunFinishedError(
            f"run '{name}' in experiment '{cfg.tracking.experiment}' already finished "
            f"(MLflow run {run_id}); start a new run by omitting tracking.run_name "
            "or with --set tracking.run_name=<new name>"
        )
    if run.info.status != "RUNNING":
        return
    tag = run.data.tags.get(DRIVER_TAG)
    state = driver_state(tag, socket.gethostname(), os.getpid(), _process_start)
    host, pid, _ = tag.rsplit(":", 2) if tag and tag.count(":") >= 2 else ("an unknown host", "?", "")
    if state == DRIVER_ALIVE:
        raise ConfigError(
            f"run '{name}' (MLflow run {run_id}) is RUNNING in process {pid} on {host}; wait for it to end or stop "
            "it (Ctrl-C there), or start a new run with --set tracking.run_name=<new name>"
        )
    if state == DRIVER_GONE:
        print(
            f"[mocolab] found a stale run '{name}' (MLflow run {run_id}) left RUNNING by a driver that is gone "
            f"(process {pid} on {host}); resuming it",
            flush=True,
        )
    elif state == DRIVER_UNKNOWN:
        print(
            f"[mocolab] run '{name}' (MLflow run {run_id}) is marked RUNNING by a driver on {host} that cannot be "
            "checked from here; resuming it (stop that driver if it still runs)",
            flush=True,
        )


def start_pretrain_run(
    cfg: Config,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    extra_params: dict[str, Any] | None = None,
) -> tuple[str, bool]:
    """Create the pretraining run named ``tracking.run_name`` (params: the config and ``extra_params``), or resume
    it if it exists unfinished; either way the run records this process as its driver (``DRIVER_TAG``).

    Returns ``(run_id, resumed)``. A FINISHED run of that name is refused (RunFinishedError), so is one whose
    driver still runs; a RUNNING one whose driver is gone is resumed with a notice."""
    client = client_for(cfg.tracking.tracking_uri)
    existing = find_run(client, cfg.tracking.experiment, cfg.tracking.run_name)
    if existing is not None:
        _check_unfinished(existing, cfg)
        run_id = existing.info.run_id
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, DRIVER_TAG, driver_id())
        for tag in (NONFINITE_LOSS_TAG, NO_LOADABLE_CHECKPOINT_TAG):  # an earlier attempt's stop is not this one's
            if tag in existing.data.tags:
                client.delete_tag(run_id, tag)
        return run_id, True
    tags = {STAGE_TAG: STAGE_PRETRAIN, DRIVER_TAG: driver_id(), **source_tags(), **(extra_tags or {})}
    if parent_run_id:
        tags[PARENT_RUN_TAG] = parent_run_id
    run = client.create_run(experiment_id(client, cfg.tracking.experiment), run_name=cfg.tracking.run_name, tags=tags)
    run_id = run.info.run_id
    log_params(client, run_id, params_of(cfg, extra_params))
    log_config_artifact(client, run_id, cfg)
    log_dataset_input(client, run_id, cfg)
    return run_id, False


def start_eval_run(
    cfg: Config,
    stage: str,
    params: dict[str, Any],
    pretrain_run_id: str | None = None,
    init: str = "pretrain",
    run_name: str | None = None,
    extra_tags: dict[str, str] | None = None,
) -> str:
    """Create an evaluation run (``stage`` = lincls|detection), linked to its pretraining run by tag."""
    client = client_for(cfg.tracking.tracking_uri)
    tags = {STAGE_TAG: stage, INIT_TAG: init, **source_tags(), **(extra_tags or {})}
    if pretrain_run_id:
        tags[PRETRAIN_RUN_TAG] = pretrain_run_id
    run = client.create_run(
        experiment_id(client, cfg.tracking.experiment),
        run_name=run_name or f"{stage}-{cfg.tracking.run_name}",
        tags=tags,
    )
    log_params(client, run.info.run_id, {k: redact(str(v))[:MAX_PARAM_CHARS] for k, v in params.items()})
    return run.info.run_id


def record_downstream(
    uri: str, pretrain_run_id: str, metrics: dict[str, float], source_run_id: str, stage: str
) -> None:
    """Copy an evaluation's headline metrics onto its pretraining run, tagging where they came from."""
    client = client_for(uri)
    log_metrics(client, pretrain_run_id, metrics, step=0)
    client.set_tag(pretrain_run_id, downstream_tag(stage), source_run_id)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark a run FINISHED, FAILED or KILLED."""
    mlflow_client(uri).set_terminated(run_id, status=status)


def log_file(uri: str, run_id: str, path: Path, artifact_path: str | None = None) -> None:
    mlflow_client(uri).log_artifact(run_id, str(path), artifact_path)


def load_pretrain_artifacts(uri: str, run_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config as a dict, the content of its backbone.pt)`` of a pretraining run (``--pretrain-run ID``),
    the weights read without running code from them (``weights_io.files.read_weights_file``)."""
    from mocolab.weights_io.files import read_weights_file

    client = client_for(uri)
    try:
        run = client.get_run(run_id)
    except Exception as err:  # mlflow raises its own RestException/MlflowException types
        raise ConfigError(
            f"--pretrain-run {run_id}: no such MLflow run in {redact(uri)} ({redact(str(err))})"
        ) from None
    if run.data.tags.get(STAGE_TAG) not in (STAGE_PRETRAIN, None):
        raise ConfigError(f"--pretrain-run {run_id} is a '{run.data.tags.get(STAGE_TAG)}' run, not a pretraining run")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            cfg_path = client.download_artifacts(run_id, CONFIG_ARTIFACT, tmp)
            weights_path = client.download_artifacts(run_id, BACKBONE_ARTIFACT, tmp)
        except Exception as err:
            raise ConfigError(
                f"--pretrain-run {run_id} (status {run.info.status}) has no {CONFIG_ARTIFACT}/{BACKBONE_ARTIFACT} "
                f"artifacts; evaluate a FINISHED pretraining run ({redact(str(err))})"
            ) from None
        config = yaml.safe_load(Path(cfg_path).read_text())
        state = read_weights_file(weights_path, f"--pretrain-run {run_id}: its {BACKBONE_ARTIFACT}")
    return config, state


def child_runs(uri: str, experiment: str, parent_run_id: str) -> list[Run]:
    """Runs whose ``mlflow.parentRunId`` is ``parent_run_id``."""
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return list(client.search_runs([exp.experiment_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'"))


def start_system_metrics(uri: str, run_id: str, interval_s: float, node_id: str | None = None):
    """Start MLflow's system-metrics monitor on run ``run_id``: CPU, memory, disk and network (and the GPUs, when
    nvidia-ml-py finds any) sampled every ``interval_s`` seconds as ``system/...`` metrics (``system/<node_id>/...``
    if given), continuing the steps of a resumed run. Returns the monitor, or None when ``interval_s`` is 0."""
    if not interval_s:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=interval_s, resume_logging=True, node_id=node_id, tracking_uri=uri
    )
    monitor.start()
    return monitor


def stop_system_metrics(monitor) -> None:
    """Stop a monitor of :func:`start_system_metrics` (None: nothing to do), then log one last sample: MLflow's
    monitor logs only after a full interval, so a run shorter than one would otherwise have none."""
    if monitor is None:
        return
    monitor.finish()
    monitor.collect_metrics()
    monitor.publish_metrics(monitor.aggregate_metrics())
    monitor.mlflow_logger.flush()


def log_backbone_model(
    uri: str, run_id: str, backbone, image_size: int, step: int, register_as: str | None = None
) -> str:
    """Log ``backbone`` (an ``nn.Module`` in eval mode mapping float32 ``[B, 3, image_size, image_size]`` images,
    normalised as in training, to features ``[B, D]``) as the MLflow model ``backbone`` of run ``run_id``, at
    ``step`` (the run's metrics at that step are linked to it): ``torch.export`` format (loading it runs no
    pickled code), with its signature and the run's params; registered as ``register_as`` when given. Returns
    the model URI.

    ``mlflow.pytorch.log_model`` takes the tracking and registry URIs, and the experiment of a model it creates,
    from MLflow's process-wide state; so the model is created here in the run's experiment, and logging runs
    with the tracking URI set to ``uri`` and the previous one restored after."""
    from importlib.metadata import version

    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    from mlflow.types import Schema, TensorSpec

    example = torch.zeros(2, 3, image_size, image_size)  # a batch of 2 so that the batch dimension stays dynamic
    with torch.no_grad():
        feat_dim = backbone(example).shape[1]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, image_size, image_size), "images")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, feat_dim), "features")]),
    )
    client = mlflow_client(uri)
    run = client.get_run(run_id)
    model = client.create_logged_model(
        run.info.experiment_id, name=BACKBONE_MODEL, source_run_id=run_id, params=run.data.params
    )
    with _use_tracking_uri(uri):
        info = mlflow.pytorch.log_model(
            backbone,
            model_id=model.model_id,
            run_id=run_id,
            step=step,
            signature=signature,
            input_example=example,
            serialization_format="pt2",
            pip_requirements=[f"torch=={version('torch')}"],
            registered_model_name=register_as,
        )
    return info.model_uri


def usage_of(run: Run) -> compute.ComputeUsage:
    """The compute a run has logged so far (zero if none)."""
    metrics = run.data.metrics
    return compute.ComputeUsage(metrics.get(WORKER_SECONDS, 0.0), metrics.get(DEVICE_HOURS, 0.0), metrics.get(COST))


def log_usage(client: MlflowClient, run_id: str, usage: compute.ComputeUsage) -> None:
    log_metrics(
        client,
        run_id,
        {WORKER_SECONDS: usage.worker_seconds, DEVICE_HOURS: usage.device_hours, COST: usage.cost},
        step=0,
    )


@contextmanager
def compute_recorded(cfg: Config, run_id: str, num_workers: int) -> Iterator[None]:
    """Time the block (a Ray Train fit of ``num_workers`` workers of ``cfg.scaling``) and add its usage to run
    ``run_id``'s totals, whether it ends, fails or is interrupted (if the block raised, a failure to log only
    prints a warning, so that the block's own exception is the one raised)."""
    started = time.monotonic()

    def record() -> None:
        attempt = compute.usage(
            time.monotonic() - started,
            num_workers,
            compute.devices_per_worker(cfg.scaling.use_gpu, cfg.scaling.cpus_per_worker),
            cfg.tracking.price_per_device_hour,
        )
        client = mlflow_client(cfg.tracking.tracking_uri)
        log_usage(client, run_id, usage_of(client.get_run(run_id)) + attempt)

    try:
        yield
    except BaseException:
        try:
            record()
        except Exception as err:  # mlflow raises its own exception types
            print(f"[mocolab] could not log the compute of run {run_id}: {err}", file=sys.stderr, flush=True)
        raise
    record()


def sweep_usage(uri: str, experiment: str, parent_run_id: str) -> compute.ComputeUsage:
    """The compute of a sweep: its trials' pretraining runs and the evaluation runs of those."""
    client = mlflow_client(uri)
    trials = child_runs(uri, experiment, parent_run_id)
    trial_ids = {run.info.run_id for run in trials}
    exp = client.get_experiment_by_name(experiment)
    evals = (
        [
            run
            for stage in (STAGE_LINCLS, STAGE_DETECTION)
            for run in client.search_runs(
                [exp.experiment_id], filter_string=f"tags.`{STAGE_TAG}` = '{stage}'", max_results=50000
            )
            if run.data.tags.get(PRETRAIN_RUN_TAG) in trial_ids
        ]
        if exp is not None
        else []
    )
    return compute.total(usage_of(run) for run in [*trials, *evals])
