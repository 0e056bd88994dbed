"""The README's cluster commands, run as written, on a real cluster on this machine (issue 20, item 4).

The stack is what `ray_cluster.yaml` builds on AWS, scaled down: a Ray head (no CPUs for training, the job server on
127.0.0.1, token auth) and two worker nodes of one CPU and one ``node_slot`` each, so the run's two workers land on
two nodes; a real PostgreSQL as MLflow's backend store behind a real ``mlflow server`` over HTTP; an S3-compatible
store on 127.0.0.1 (moto's server) holding the dataset, the checkpoints and MLflow's artifacts. Every node exports the
AWS variables and ``MLFLOW_TRACKING_URI`` before ``ray start``, as the nodes of ray_cluster.yaml do, so the jobs need
nothing else.

The ``ray job submit`` commands are read out of README.md (tests/readme_commands.py); only placeholders (``BUCKET``,
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
from pathlib import Path

import pytest
import yaml
from console_output import chatter
from local_cluster import local_cluster
from mlflow import MlflowClient
from readme_commands import readme_job_commands

from mocolab.config import parse_override

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SLOT = "node_slot"
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


def test_the_readme_cluster_commands_run_as_written(s3, mlflow_on_postgres):
    started = time.monotonic()

    def mark(event: str) -> None:
        print(f"[cluster-e2e] {time.monotonic() - started:6.1f} s  {event}", flush=True)

    store, bucket = s3, s3.bucket
    s3 = store.client()
    n_objects = upload_dataset(s3, bucket, REPO.parent / "shared/data/cifar10-subset", {"train": 16, "val": 8})
    mark(f"{n_objects} images in s3://{bucket}/{DATA_PREFIX}")
    commands = readme_job_commands(REPO)
    node_env = {**store.env, "MLFLOW_TRACKING_URI": mlflow_on_postgres.uri}
    with local_cluster(node_env=node_env, dashboard=True) as cluster:
        cluster.add_node(num_cpus=0, resources={})  # the head: job drivers, Ray Train's controller; no training
        cluster.add_node(num_cpus=1, resources={SLOT: 1})
        second = cluster.add_node(num_cpus=1, resources={SLOT: 1})
        mark("head + 2 worker nodes up")
        jobs = Jobs(cluster, bucket)
        replace = {"BUCKET": bucket, "http://127.0.0.1:8265": cluster.dashboard_url}

        # 1. Pretraining, as written; a worker node is lost once an epoch's checkpoint is in the bucket.
        run_prefix = f"mocolab/ray_results/{RUN_NAME}"
        pretrain = jobs.start("pretrain", commands["pretrain"].argv(replace, extra=[
            *(f"--set={item}" for item in SCALE + PRETRAIN_SCALE)]))  # fmt: skip
        deadline = time.monotonic() + 420
        while registered_epoch(s3, bucket, run_prefix) < 1:
            assert pretrain.poll() is None, jobs.logs["pretrain"].read_text()[-8000:]
            assert time.monotonic() < deadline, "no checkpoint registered in the bucket within 420 s"
            time.sleep(0.5)
        lost_at = registered_epoch(s3, bucket, run_prefix)
        victims = cluster.kill_node(second)
        mark(f"epoch {lost_at} checkpoint in the bucket; second worker node killed ({len(victims)} processes)")
        cluster.add_node(num_cpus=1, resources={SLOT: 1})  # the only way back to two slots: the run needs it
        mark("replacement node up")
        pretrain.wait(900)
        pretrain_log = jobs.finished("pretrain", pretrain)
        mark("pretraining job finished")
        assert lost_at < EPOCHS, "the run had finished before the node was lost"
        assert "resumed from epoch " in pretrain_log, pretrain_log[-6000:]

        client = MlflowClient(mlflow_on_postgres.uri)  # over HTTP, as a laptop through a tunnel would
        experiment = client.get_experiment_by_name("imagenet-moco")
        (run,) = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{RUN_NAME}'")
        run_id = run.info.run_id
        assert run.info.status == "FINISHED"
        assert run.data.params["data.root"] == f"s3://{bucket}/{DATA_PREFIX}"
        assert run.data.params["scaling.storage_path"] == f"s3://{bucket}/mocolab/ray_results"
        assert not any(store.env["AWS_SECRET_ACCESS_KEY"] in value for value in run.data.params.values())
        steps = [m.step for m in client.get_metric_history(run_id, "loss")]
        assert sorted(set(steps)) == list(range(1, EPOCHS + 1))  # every epoch, in the one run
        assert "lincls_top1" in run.data.metrics  # the config's eval.lincls ran after it and was copied back
        assert chatter(pretrain_log) == []
        checkpoints = store.keys(run_prefix)
        assert sum(key.endswith("/checkpoint.pt") for key in checkpoints) >= EPOCHS
        artifacts = store.keys("mocolab/mlflow-artifacts")
        assert any(key.endswith(f"{run_id}/artifacts/backbone.pt") for key in artifacts), artifacts[:20]

        # 2. The README's linear eval of that run, by its run ID.
        lincls_log = jobs.run("lincls", commands["lincls"].argv({**replace, "RUN_ID": run_id}, extra=[
            *(f"--set={item}" for item in SCALE)]), timeout_s=600)  # fmt: skip
        mark("linear eval job finished")
        lincls_runs = client.search_runs(
            [experiment.experiment_id], f"tags.`mocolab.pretrain_run_id` = '{run_id}' and tags.`mocolab.stage` = 'lincls'"
        )
        assert len(lincls_runs) == 2 and all(r.info.status == "FINISHED" for r in lincls_runs)  # configured + README's
        assert "top-1" in lincls_log

        # 3. A 2-trial sweep (the README's sweep file at CPU scale).
        bucket_sets = [arg for arg in commands["sweep"].argv(replace)[1:] if "s3://" in arg]
        sweep = sweep_file(cluster.folder, bucket_sets)
        jobs.run("sweep", commands["sweep"].argv(replace, config=str(sweep)), timeout_s=900)
        mark("sweep job finished")
        sweep_runs = client.search_runs([experiment.experiment_id], "tags.`mocolab.sweep` = 'temperature-e2e'")
        (parent,) = [r for r in sweep_runs if r.data.tags.get("mocolab.stage") == "sweep"]
        trials = [r for r in sweep_runs if r.data.tags.get("mocolab.stage") == "pretrain"]
        assert len(trials) == 2 and {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent.info.run_id}
        assert {r.data.params["moco.temperature"] for r in trials} == {"0.1", "0.2"}
        assert all(r.info.status == "FINISHED" and "knn_top1" in r.data.metrics for r in trials)

        # 4. The tracking server restarted on the same database: every run is still there (SQLite on the head's
        # disk would have gone with `ray down`).
        before = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id])}
        mlflow_on_postgres.restart()
        mark("MLflow server restarted")
        after = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id])}
        assert set(after) == set(before) and len(after) >= 1 + 2 + 1 + 2
        assert after[run_id].data.metrics == before[run_id].data.metrics
        assert {a.path for a in client.list_artifacts(run_id)} >= {"config.yaml", "backbone.pt"}
