"""Small MLflow stores for the analysis and notebook tests, made directly with the MLflow client (no training)."""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from mocolab import tracking
from mocolab.tracking.names import SWEEP_AXES_TAG

# momentum -> final knn_top1 of seeds 0 and 1
MOMENTUM_KNN = {0.0: (36.0, 38.0), 0.9: (44.0, 45.0), 0.99: (53.0, 53.0), 0.999: (58.0, 60.0)}
# (mechanism, queue_size, batch_size) -> final knn_top1 of seeds 0 and 1
MECHANISM_KNN = {
    ("end_to_end", 4096, 32): (40.0, 42.0),
    ("end_to_end", 4096, 64): (44.0, 46.0),
    ("memory_bank", 256, 32): (38.0, 40.0),
    ("memory_bank", 1024, 32): (41.0, 43.0),
    ("moco", 256, 32): (47.0, 49.0),
    ("moco", 1024, 32): (52.0, 54.0),
}


def _sweep_parent(client: MlflowClient, exp_id: str, name: str, axes: list[str]) -> str:
    tags = {tracking.STAGE_TAG: "sweep", tracking.SWEEP_TAG: name, SWEEP_AXES_TAG: ",".join(axes)}
    return client.create_run(exp_id, run_name=name, tags=tags).info.run_id


def _trial(client, exp_id, sweep, parent, index, params, knn, status="FINISHED", lincls=None) -> str:
    tags = {tracking.STAGE_TAG: "pretrain", tracking.SWEEP_TAG: sweep, tracking.PARENT_RUN_TAG: parent}
    run_id = client.create_run(exp_id, run_name=f"{sweep}-{index:05d}", tags=tags).info.run_id
    base = {
        "moco.momentum": "0.99",
        "moco.mechanism": "moco",
        "moco.queue_size": "256",
        "train.batch_size": "32",
        "effective_k": "256",
        "negatives": "256",
        "scaling.num_workers": "1",
        "train.epochs": "3",
        "tracking.run_name": f"{sweep}-{index:05d}",
    }
    params = [Param(k, str(v)) for k, v in {**base, **params}.items()]
    metrics = [
        Metric(name, value, 0, epoch)
        for epoch in range(3)  # a rising curve that ends at `knn`
        for name, value in (("knn_top1", knn - 10 * (2 - epoch)), ("loss", 5.0 - epoch))
    ]
    if lincls is not None:
        metrics.append(Metric("lincls_top1", lincls, 0, 0))
    client.log_batch(run_id, metrics=metrics, params=params)  # one call: a sqlite store is slow per call
    client.set_terminated(run_id, status=status)
    return run_id


def make_store(folder: Path, experiment: str = "sweeps") -> str:
    """A sqlite store in ``folder`` holding ``make_momentum_sweep`` and ``make_mechanism_sweep``; its URI."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    client.create_experiment(experiment, artifact_location=(folder / "artifacts").as_uri())
    make_momentum_sweep(uri, experiment=experiment)
    make_mechanism_sweep(uri, experiment=experiment)
    return uri


def make_momentum_sweep(uri: str, name: str = "momentum_test", experiment: str = "sweeps") -> list[str]:
    """A finished momentum sweep (4 values x 2 seeds, lincls on seed 0) and one failed trial."""
    client = MlflowClient(tracking_uri=uri)
    exp_id = tracking.experiment_id(client, experiment)
    parent = _sweep_parent(client, exp_id, name, ["moco.momentum"])
    ids, index = [], 0
    for momentum, knns in MOMENTUM_KNN.items():
        for seed, knn in enumerate(knns):
            lincls = knn + 5 if seed == 0 else None
            ids.append(
                _trial(
                    client,
                    exp_id,
                    name,
                    parent,
                    index,
                    {"moco.momentum": momentum, "train.seed": seed},
                    knn,
                    lincls=lincls,
                )
            )
            index += 1
    _trial(client, exp_id, name, parent, index, {"moco.momentum": 0.9999, "train.seed": 0}, 10.0, status="FAILED")
    client.set_terminated(parent, status="FINISHED")
    return ids


def make_mechanism_sweep(uri: str, name: str = "mechanism_test", experiment: str = "sweeps") -> None:
    """A finished mechanism x K sweep (2 seeds each)."""
    client = MlflowClient(tracking_uri=uri)
    exp_id = tracking.experiment_id(client, experiment)
    axes = ["moco.mechanism", "moco.queue_size", "train.batch_size"]
    parent = _sweep_parent(client, exp_id, name, axes)
    index = 0
    for (mechanism, queue, batch), knns in MECHANISM_KNN.items():
        for seed, knn in enumerate(knns):
            params = {
                "moco.mechanism": mechanism,
                "moco.queue_size": queue,
                "train.batch_size": batch,
                "train.seed": seed,
                "effective_k": batch if mechanism == "end_to_end" else queue,
                "negatives": batch - 1 if mechanism == "end_to_end" else queue,
            }
            _trial(client, exp_id, name, parent, index, params, knn)
            index += 1
    client.set_terminated(parent, status="FINISHED")
