"""mocolab: MoCo self-supervised pretraining on Ray, tracked in MLflow."""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow prints run links built from the tracking URI, credentials included; mocolab prints run ids itself.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

__version__ = "0.1.0"
