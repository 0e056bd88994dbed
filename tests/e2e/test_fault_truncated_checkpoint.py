"""A truncated checkpoint never blocks resume (issue 11, case 3).

A run is killed after a checkpoint (epoch 2 or later) is registered; that checkpoint's ``checkpoint.pt`` is
then truncated (a full disk, a half-finished copy to shared storage). Relaunched under the same name, the run
resumes from the newest checkpoint that loads (the epoch before), says which file was bad and where it resumed
(MLflow tag ``mocolab.resume_fallback``), and finishes in the same MLflow run. With every checkpoint broken
it stops at once, without Ray retries, with one message naming the files and the fix.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import ray.train
import torch
from fault_injection import kill_a_worker_after_checkpoint, registered_checkpoint, registered_checkpoints
from mlflow import MlflowClient

from mocolab import tracking
from mocolab.config import build_config
from mocolab.orchestrate import run_pretrain
from mocolab.train.checkpoint import CHECKPOINT_FILE, load_checkpoint
from mocolab.train.resume import NoLoadableCheckpointError

EPOCHS = 5
STEPS_PER_EPOCH = 4  # 256 images / (2 workers x 32)
KEYS_PER_EPOCH = STEPS_PER_EPOCH * 64
QUEUE = 2048


def config(tmp_path: Path):
    raw = {
        "moco": {"version": "v2", "dim": 32, "queue_size": QUEUE, "momentum": 0.99, "temperature": 0.2},
        "model": {"arch": "small_cnn", "bn": "shuffle"},
        "data": {"dataset": "digits", "image_size": 24, "loader_workers": 0, "limit_train": 256},
        "train": {
            "epochs": EPOCHS,
            "batch_size": 32,
            "lr": 0.03,
            "knn_every": 0,
            "keep_checkpoints": EPOCHS + 1,
            "max_failures": 0,
        },  # fmt: skip
        "scaling": {"num_workers": 2, "storage_path": str(tmp_path / "ray_results")},
        "tracking": {
            "experiment": "truncated",
            "run_name": "truncated",
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        },  # fmt: skip
    }
    return build_config(raw, base=tmp_path)


def checkpoint_dirs(run_folder: Path) -> set[Path]:
    """Every checkpoint folder on disk, registered by Ray or not (one a worker was still reporting when killed)."""
    return {p.parent for p in run_folder.glob(f"checkpoint_*/{CHECKPOINT_FILE}")}


def by_epoch(dirs) -> dict[int, Path]:
    return {load_checkpoint(d)["epoch"]: d for d in dirs}


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def queue_of(state: dict) -> tuple[torch.Tensor, int]:
    (queue_key,) = [k for k in state["model"] if k.endswith("queue")]
    (ptr_key,) = [k for k in state["model"] if k.endswith("queue_ptr")]
    return state["model"][queue_key], int(state["model"][ptr_key])


@pytest.mark.slow
def test_truncated_checkpoint_falls_back_to_the_newest_that_loads(ray_local, mlflow_uri, tmp_path):
    cfg = config(tmp_path)
    run_folder = Path(cfg.scaling.storage_path, cfg.tracking.run_name)
    killed: dict = {}
    killer = threading.Thread(
        target=kill_a_worker_after_checkpoint, args=(ray_local, run_folder, killed), kwargs={"epoch": 2}, daemon=True
    )
    killer.start()
    with pytest.raises(ray.train.TrainingFailedError):  # train.max_failures=0: the kill ends the run
        run_pretrain(cfg)
    killer.join(timeout=5)
    last, registered = registered_checkpoint(run_folder)
    assert 2 <= killed.get("registered_epoch", 0) == last < EPOCHS, (killed, last)

    client = MlflowClient(cfg.tracking.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("truncated").experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FAILED"
    saved = by_epoch(registered_checkpoints(run_folder))
    assert sorted(saved) == list(range(1, last + 1)) and saved[last] == registered
    on_disk = checkpoint_dirs(run_folder)
    previous_file, last_file = saved[last - 1] / CHECKPOINT_FILE, saved[last] / CHECKPOINT_FILE
    previous_bytes = previous_file.read_bytes()
    previous_state = load_checkpoint(saved[last - 1])

    # Every checkpoint broken: one message naming the files and the fix; no Ray retry, no training.
    for folder in saved.values():
        truncate(folder / CHECKPOINT_FILE)
    with pytest.raises(NoLoadableCheckpointError) as err:
        run_pretrain(cfg)
    message = str(err.value)
    assert f"{last} checkpoint(s)" in message and "PytorchStreamReader" in message
    positions = [message.index(str(saved[epoch] / CHECKPOINT_FILE)) for epoch in sorted(saved, reverse=True)]
    assert positions == sorted(positions)  # tried newest epoch first
    assert "--set tracking.run_name=" in message and "Traceback" not in message
    assert client.get_run(run_id).info.status == "FAILED"
    assert checkpoint_dirs(run_folder) == on_disk

    # The checkpoint before the last put back (e.g. from a backup): resumes from it and finishes.
    previous_file.write_bytes(previous_bytes)
    assert run_pretrain(cfg) == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert tracking.NO_LOADABLE_CHECKPOINT_TAG not in run.data.tags  # the previous attempt's stop is cleared
    note = run.data.tags[tracking.RESUME_FALLBACK_TAG]
    assert note.startswith(f"could not load {last_file} (RuntimeError: PytorchStreamReader failed")
    assert note.endswith(f"resumed from epoch {last - 1} ({saved[last - 1]})")
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert sorted(set(steps)) == list(range(1, EPOCHS + 1))
    assert all(steps.count(e) == 1 for e in range(1, last)) and steps.count(last) == 2  # only `last` trained again

    # The first checkpoint after the fallback continues the queue saved one epoch before the last.
    new = by_epoch(checkpoint_dirs(run_folder) - on_disk)
    assert sorted(new) == list(range(last, EPOCHS + 1))
    after = load_checkpoint(new[last])
    saved_queue, saved_ptr = queue_of(previous_state)
    queue, ptr = queue_of(after)
    assert saved_ptr == (last - 1) * KEYS_PER_EPOCH % QUEUE and ptr == (saved_ptr + KEYS_PER_EPOCH) % QUEUE
    written = torch.zeros(QUEUE, dtype=torch.bool)
    written[(saved_ptr + torch.arange(KEYS_PER_EPOCH)) % QUEUE] = True
    assert torch.equal(queue[~written], saved_queue[~written])
    assert not torch.equal(queue[written], saved_queue[written])
    assert after["global_step"] == previous_state["global_step"] + STEPS_PER_EPOCH == last * STEPS_PER_EPOCH
