"""Artifacts and models of runs: the resolved config, the training set as the run's dataset input, files, a
pretraining run's ``config.yaml`` + ``backbone.pt`` read back, the final backbone as an MLflow logged model."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import yaml

from mocolab.config import Config, ConfigError
from mocolab.tracking.masking import redact, redact_tree
from mocolab.tracking.names import (
    BACKBONE_ARTIFACT,
    BACKBONE_MODEL,
    CONFIG_ARTIFACT,
    DATASET_CONTEXT_TAG,
    STAGE_PRETRAIN,
    STAGE_TAG,
    TRAINING_CONTEXT,
)
from mocolab.tracking.store import client_for, mlflow_client

if TYPE_CHECKING:  # mlflow is imported where it is used
    from mlflow import MlflowClient


class DatasetFacts(Protocol):
    """What :func:`log_dataset_input` logs of a training set (``data.datasets.summarize`` gives it)."""

    name: str
    root: str | None
    num_images: int
    digest: str


def log_config_artifact(client: MlflowClient, run_id: str, cfg: Config) -> None:
    """Store the resolved config as ``config.yaml`` at the root of the run's artifacts."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CONFIG_ARTIFACT
        path.write_text(yaml.safe_dump(redact_tree(cfg.model_dump(mode="json")), sort_keys=False))
        client.log_artifact(run_id, str(path))


def log_dataset_input(client: MlflowClient, run_id: str, facts: DatasetFacts, dataset: str) -> None:
    """Log the training set (``facts``, of config ``data.dataset`` = ``dataset``) as the run's dataset input
    (context ``training``): its name, where it lives (a local folder, or the code that makes it), its image count
    as the profile and a digest of its file list."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    if facts.root is not None:  # as mlflow.data's local and code dataset sources write themselves
        source_type, source = "local", {"uri": redact(facts.root)}
    else:
        source_type, source = "code", {"tags": {"mocolab.data.dataset": dataset}}
    logged = Dataset(
        name=facts.name,
        digest=facts.digest,
        source_type=source_type,
        source=json.dumps(source),
        profile=json.dumps({"num_images": facts.num_images}),
    )
    client.log_inputs(run_id, datasets=[DatasetInput(logged, tags=[InputTag(DATASET_CONTEXT_TAG, TRAINING_CONTEXT)])])


def log_file(uri: str, run_id: str, path: Path, artifact_path: str | None = None) -> None:
    mlflow_client(uri).log_artifact(run_id, str(path), artifact_path)


def load_pretrain_artifacts(
    uri: str, run_id: str, read_weights: Callable[[Path, str], Any]
) -> tuple[dict[str, Any], Any]:
    """``(config as a dict, the content of its backbone.pt)`` of a pretraining run (``--pretrain-run ID``),
    the weights read by ``read_weights(path, where)`` (the caller's ``weights_io.files.read_weights_file``,
    which runs no code from them)."""
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
        state = read_weights(Path(weights_path), f"--pretrain-run {run_id}: its {BACKBONE_ARTIFACT}")
    return config, state


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
