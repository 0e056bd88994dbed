"""The README's cluster commands, run as written, on a real cluster on this machine (issue 20, item 4).

The stack is what `ray_cluster.yaml` builds on AWS, scaled down: a Ray head (no CPUs for training, the job server on
127.0.0.1, token auth) and two worker nodes of one CPU and one ``node_slot`` each, so the run's two workers land on
two nodes; a real PostgreSQL as MLflow's backend store behind a real ``mlflow server`` over HTTP; an S3-compatible
store on 127.0.0.1 (moto's server) holding the dataset, the checkpoints and MLflow's artifacts. Every node exports the
AWS variables and ``MLFLOW_TRACKING_URI`` before ``ray start``, as the nodes of ray_cluster.yaml do, so the jobs need
nothing else.

The ``ray job submit`` commands are read out of README.md (tests/support/readme_commands.py); only placeholders
(``BUCKET``,
``RUN_ID``, the job server's address) and scale (the sweep file, ``--set`` for a small CPU run) are substituted.
Then: pretraining (with its configured linear eval), a worker node SIGKILLed once a checkpoint is in the bucket and a
replacement started, the run finishing in the same MLflow run; the README's linear eval on that run; a 2-trial sweep;
runs, params, metrics and links checked over HTTP, checkpoints and artifacts in the bucket; the MLflow server
restarted on the same database with every run still there.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from console_output import chatter, progress_lines
from local_cluster import JOB_SLOT as SLOT
from mlflow import MlflowClient
from readme_commands import readme_job_commands

from mocolab.config import parse_override

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RUN_NAME = "imagenet-v2"  # the README's tracking.run_name
DATA_PREFIX = "mocolab/data/imagenet"
EPOCHS = 4
SCALE = [  # a small CPU run of the README's configs: 2 one-CPU workers, one per node, small images and model
    "scaling.num_workers=2", "scaling.use_gpu=false", "scaling.cpus_per_worker=1",
    f"scaling.resources_per_worker.{SLOT}=1", "data.image_size=32", "data.loader_workers=0",
    "eval.lincls.num_workers=2", "eval.lincls.epochs=1", "eval.lincls.batch_size=16",
]  # fmt: skip
PRETRAIN_SCALE = [
    "model.arch=small_cnn", "moco.queue_size=256", f"train.epochs={EPOCHS}", "train.batch_size=8",
    "train.knn_bank_images=160", "train.knn_test_images=80", f"train.keep_checkpoints={EPOCHS + 1}",
]  # fmt: skip


def upload_dataset(s3, bucket: str, source: Path, per_class: dict[str, int]) -> int:
    """The first images of each class of the shared CIFAR-10 subset, as ``<prefix>/<split>/<class>/<file>``
    (ImageNet's split names: ``train``, ``val``). Returns the number of objects."""
    count = 0
    for split, source_split in (("train", "train"), ("val", "test")):
        for class_dir in sorted((source / source_split).iterdir()):
            for image in sorted(class_dir.iterdir())[: per_class[split]]:
                s3.upload_file(str(image), bucket, f"{DATA_PREFIX}/{split}/{class_dir.name}/{image.name}")
                count += 1
    return count


def registered_epoch(s3, bucket: str, run_prefix: str) -> int:
    """The epoch of the latest checkpoint Ray Train's controller has registered in the bucket (0 before any)."""
    try:
        body = s3.get_object(Bucket=bucket, Key=f"{run_prefix}/checkpoint_manager_snapshot.json")["Body"].read()
    except s3.exceptions.NoSuchKey:
        return 0
    latest = json.loads(body).get("latest_checkpoint_result") or {}
    return int(latest.get("metrics", {}).get("epoch", 0))


class Jobs:
    """``ray job submit`` runs against one cluster, each with its log kept for the assertions."""

    def __init__(self, cluster, bucket: str):
        self.cluster, self.bucket, self.logs = cluster, bucket, {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = self.cluster.folder / f"job-{name}.log"
        self.logs[name] = log
        return subprocess.Popen(argv, cwd=REPO, env=self.cluster.env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)

    def run(self, name: str, argv: list[str], timeout_s: float) -> str:
        job = self.start(name, argv)
        job.wait(timeout_s)
        return self.finished(name, job)

    def finished(self, name: str, job: subprocess.Popen) -> str:
        text = self.logs[name].read_text(errors="replace")
        assert job.returncode == 0, f"job {name} failed (exit {job.returncode}):\n{text[-8000:]}"
        assert "succeeded" in text, text[-4000:]
        return text


def sweep_file(folder: Path, bucket_overrides: list[str]) -> Path:
    """The README's sweep (experiments/sweeps/temperature.yaml) at CPU scale: the same base config, 2 temperatures,
    one-CPU trials placed like the pretraining run's workers."""
    readme_sweep = yaml.safe_load((REPO / "experiments/sweeps/temperature.yaml").read_text())
    base = {"config": str(REPO / "experiments/sweeps" / readme_sweep["base"]["config"])}
    base.update(parse_override(item) for item in SCALE + PRETRAIN_SCALE + bucket_overrides)
    base.update({"train.epochs": 2, "train.knn_every": 1})
    spec = {**readme_sweep, "name": "temperature-e2e", "base": base,
            "space": {"moco.temperature": {"grid": [0.1, 0.2]}},
            "resources": {"workers": 2, "cpus_per_worker": 1}, "max_concurrent_trials": 1}  # fmt: skip
    path = folder / "temperature-e2e.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@dataclass
class Ran:
    """What the README's three jobs left: their logs, the pretraining run, the epoch whose checkpoint was
    registered when a node was lost."""

    logs: dict[str, str]
    client: MlflowClient
    experiment_id: str
    run_id: str
    lost_at: int


def pretrain_losing_a_node(jobs: Jobs, argv: list[str], store, mark) -> tuple[str, int]:
    """Run the pretraining job; once an epoch's checkpoint is registered in the bucket, SIGKILL the last worker node
    and start a replacement (the run's two workers need both slots). Returns the job's log and that epoch."""
    cluster, s3 = jobs.cluster, store.client()
    run_prefix = f"mocolab/ray_results/{RUN_NAME}"
    job = jobs.start("pretrain", argv)
    deadline = time.monotonic() + 420
    while registered_epoch(s3, store.bucket, run_prefix) < 1:
        assert job.poll() is None, jobs.logs["pretrain"].read_text()[-8000:]
        assert time.monotonic() < deadline, "no checkpoint registered in the bucket within 420 s"
        time.sleep(0.5)
    lost_at = registered_epoch(s3, store.bucket, run_prefix)
    victims = cluster.kill_node(cluster.nodes[-1])
    mark(f"epoch {lost_at} checkpoint in the bucket; a worker node killed ({len(victims)} processes)")
    cluster.add_node(num_cpus=1, resources={SLOT: 1})
    mark("replacement node up")
    job.wait(900)
    return jobs.finished("pretrain", job), lost_at


@pytest.fixture(scope="module")
def ran(s3, mlflow_on_postgres, job_cluster) -> Ran:
    """The README's pretraining (a node lost mid-run), linear eval and sweep jobs, run as written on the job cluster
    with the data in the bucket."""
    started = time.monotonic()

    def mark(event: str) -> None:
        print(f"[cluster-e2e] {time.monotonic() - started:6.1f} s  {event}", flush=True)

    n_objects = upload_dataset(s3.client(), s3.bucket, REPO.parent / "shared/data/cifar10-subset",
                               {"train": 16, "val": 8})  # fmt: skip
    mark(f"{n_objects} images in s3://{s3.bucket}/{DATA_PREFIX}")
    commands = readme_job_commands(REPO)
    jobs = Jobs(job_cluster, s3.bucket)
    replace = {"BUCKET": s3.bucket, "http://127.0.0.1:8265": job_cluster.dashboard_url}
    scale = [f"--set={item}" for item in SCALE]

    pretrain_argv = commands["pretrain"].argv(replace, extra=scale + [f"--set={item}" for item in PRETRAIN_SCALE])
    logs = {}
    logs["pretrain"], lost_at = pretrain_losing_a_node(jobs, pretrain_argv, s3, mark)
    mark("pretraining job finished")
    client = MlflowClient(mlflow_on_postgres.uri)  # over HTTP, as a laptop through a tunnel would
    experiment_id = client.get_experiment_by_name("imagenet-moco").experiment_id
    (run,) = client.search_runs([experiment_id], f"attributes.run_name = '{RUN_NAME}'")

    logs["lincls"] = jobs.run("lincls", commands["lincls"].argv({**replace, "RUN_ID": run.info.run_id}, extra=scale),
                              timeout_s=600)  # fmt: skip
    mark("linear eval job finished")
    bucket_sets = [arg for arg in commands["sweep"].argv(replace) if "s3://" in arg]
    sweep = sweep_file(job_cluster.folder, bucket_sets)
    logs["sweep"] = jobs.run("sweep", commands["sweep"].argv(replace, config=str(sweep)), timeout_s=900)
    mark("sweep job finished")
    return Ran(logs, client, experiment_id, run.info.run_id, lost_at)


def test_pretraining_survives_a_lost_node_in_one_mlflow_run(ran, s3):
    assert ran.lost_at < EPOCHS, "the run had finished before the node was lost"
    assert f"resumed from epoch {ran.lost_at}" in ran.logs["pretrain"], ran.logs["pretrain"][-6000:]
    run = ran.client.get_run(ran.run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in ran.client.get_metric_history(ran.run_id, "loss")]
    assert sorted(set(steps)) == list(range(1, EPOCHS + 1))  # every epoch, in the one run
    assert all(steps.count(epoch) == 1 for epoch in range(1, ran.lost_at + 1))  # none before the checkpoint again
    checkpoints = s3.keys(f"mocolab/ray_results/{RUN_NAME}")
    assert sum(key.endswith("/checkpoint.pt") for key in checkpoints) >= EPOCHS


def test_pretraining_run_reads_the_bucket_and_files_everything(ran, s3, mlflow_on_postgres):
    run = ran.client.get_run(ran.run_id)
    assert run.data.params["data.root"] == f"s3://{s3.bucket}/{DATA_PREFIX}"
    assert run.data.params["scaling.storage_path"] == f"s3://{s3.bucket}/mocolab/ray_results"
    secret = s3.env["AWS_SECRET_ACCESS_KEY"]
    assert not any(secret in value for value in [*run.data.params.values(), *run.data.tags.values()])
    assert "lincls_top1" in run.data.metrics  # the config's eval.lincls ran after it and was copied back
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "imagenet/train" and f"s3://{s3.bucket}/{DATA_PREFIX}" in (
        dataset_input.dataset.source
    )
    (output,) = run.outputs.model_outputs
    assert ran.client.get_logged_model(output.model_id).name == "backbone"
    assert any(key.endswith(f"{ran.run_id}/artifacts/backbone.pt") for key in s3.keys("mocolab/mlflow-artifacts"))
    assert run.data.tags["mlflow.source.name"] == "mocolab pretrain"
    log = ran.logs["pretrain"]
    assert f"[mocolab] MLflow UI: {mlflow_on_postgres.uri}/#/experiments/" in log
    assert chatter(log) == []  # mocolab's lines, none of Ray's internals
    epoch_lines = [line for line in progress_lines(log) if line.startswith("[mocolab] epoch")]
    assert len(epoch_lines) == len(set(epoch_lines)) >= EPOCHS  # each node streams its own workers' lines once


def test_linear_eval_of_the_run_by_its_id(ran):
    lincls_runs = ran.client.search_runs(
        [ran.experiment_id], f"tags.`mocolab.pretrain_run_id` = '{ran.run_id}' and tags.`mocolab.stage` = 'lincls'"
    )
    assert len(lincls_runs) == 2  # the config's eval.lincls after pretraining, and the README's lincls job
    assert all(r.info.status == "FINISHED" and "lincls_top1" in r.data.metrics for r in lincls_runs)
    assert "top-1" in ran.logs["lincls"]


def test_sweep_has_a_parent_and_its_trials(ran):
    runs = ran.client.search_runs([ran.experiment_id], "tags.`mocolab.sweep` = 'temperature-e2e'")
    (parent,) = [r for r in runs if r.data.tags.get("mocolab.stage") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("mocolab.stage") == "pretrain"]
    assert len(trials) == 2 and {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent.info.run_id}
    assert {r.data.params["moco.temperature"] for r in trials} == {"0.1", "0.2"}
    assert all(r.info.status == "FINISHED" and "knn_top1" in r.data.metrics for r in trials)


def test_every_run_outlives_the_tracking_server(ran, mlflow_on_postgres):
    """Restarted on the same database, the server has every run (SQLite on the head's disk went with `ray down`)."""
    before = {r.info.run_id: r for r in ran.client.search_runs([ran.experiment_id])}
    mlflow_on_postgres.restart()
    after = {r.info.run_id: r for r in ran.client.search_runs([ran.experiment_id])}
    assert set(after) == set(before) and len(after) >= 1 + 2 + 1 + 2
    assert after[ran.run_id].data.metrics == before[ran.run_id].data.metrics
    assert {a.path for a in ran.client.list_artifacts(ran.run_id)} >= {"config.yaml", "backbone.pt"}
