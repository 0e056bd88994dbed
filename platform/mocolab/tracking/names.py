"""Every MLflow name mocolab uses: tags, stages, metrics, artifacts (no MLflow code here).

Pretraining, evaluations, sweeps and the analysis agree on these names (see platform/ARCHITECTURE.md).
"""

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
MAX_TAG_CHARS = 8000  # MLflow refuses longer tag values


def downstream_tag(stage: str) -> str:
    """The tag on a pretraining run naming its evaluation run of ``stage``: ``mocolab.lincls_run_id``."""
    return f"mocolab.{stage}_run_id"
