"""``data.reader=stream``: Ray Data reads, decodes and two-crop augments the images, the workers iterate their equal
shards. A 2-worker run on a real local Ray finishes in lockstep and logs its loss, counts a skipped corrupt image,
and resumes at an epoch boundary; the map function keeps ``data.on_corrupt``'s two behaviours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from mocolab import tracking
from mocolab.config import ConfigError, build_config
from mocolab.data.images import CorruptImageError
from mocolab.data.sources import image_source
from mocolab.data.stream import TwoCropBatch, pretrain_dataset, steps_per_epoch
from mocolab.runtime import ensure_ray
from mocolab.train.checkpoint import load_checkpoint
from mocolab.train.launch import build_trainer

GOOD, BATCH, WORKERS = 95, 16, 2  # + 1 corrupt = 96 rows: 48 per worker, 3 steps each


def image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(GOOD):
        (root / f"g{i % 4}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / f"g{i % 4}" / f"{i:03d}.png")
    (root / "g0" / "broken.png").write_bytes(b"\x89PNG truncated")
    return root


def stream_config(tmp_path: Path, name: str, epochs: int, **data):
    raw = {
        "moco": {"version": "v2", "dim": 16, "queue_size": 96, "momentum": 0.99, "temperature": 0.2},
        "model": {"arch": "small_cnn", "bn": "shuffle"},
        "data": {
            "dataset": "folder",
            "root": str(tmp_path / "images"),
            "image_size": 16,
            "reader": "stream",
            "stream_cpus": 0,
            "on_corrupt": "skip",
            **data,
        },
        "train": {"epochs": epochs, "batch_size": BATCH, "lr": 0.03, "keep_checkpoints": 3, "knn_every": 0},
        "scaling": {"num_workers": WORKERS, "storage_path": str(tmp_path / "ray_results")},
        "tracking": {"experiment": "stream", "run_name": name, "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    return build_config(raw, base=tmp_path)


def test_stream_reads_image_files_only():
    with pytest.raises(ConfigError, match="data.reader=stream reads image files .* use data.reader=loader"):
        build_config({"data": {"dataset": "digits", "reader": "stream"}})


def test_decode_tasks_that_could_never_start_are_refused(tmp_path):
    from mocolab.preflight.cluster import stream_cpu_shortfall

    cfg = stream_config(tmp_path, "x", 1, stream_cpus=1)
    assert stream_cpu_shortfall(cfg, cpus=2) == (
        "data.stream_cpus=1: the training workers hold 2 of the local Ray's 2 CPUs, so Ray Data's decode tasks could "
        "never start; set data.stream_cpus=0 (decode beside the workers) or lower scaling.num_workers / "
        "scaling.cpus_per_worker"
    )
    assert stream_cpu_shortfall(cfg, cpus=3) is None
    cfg.data.stream_cpus = 0
    assert stream_cpu_shortfall(cfg, cpus=2) is None


def test_equal_shares_in_whole_batches():
    assert steps_per_epoch(96, 2, 16) == 3 and steps_per_epoch(100, 3, 16) == 2 and steps_per_epoch(10, 2, 16) == 0


def test_the_map_function_fails_naming_the_file_or_skips_and_counts(tmp_path):
    folder = image_folder(tmp_path / "images")
    cfg = stream_config(tmp_path, "x", 1)
    rows = {
        "location": np.array([str(folder / "g0" / "000.png"), str(folder / "g0" / "broken.png")]),
        "index": np.array([7, 9]),
    }
    out = TwoCropBatch(cfg.data)(rows)
    assert out["view_q"].shape == out["view_k"].shape == (2, 16, 16, 3) and out["view_q"].dtype == np.uint8  # as made
    assert out["index"].tolist() == [7, 7] and out["skipped"].tolist() == [0, 1]  # the slot refilled, counted
    cfg.data.on_corrupt = "fail"
    with pytest.raises(CorruptImageError, match=rf"cannot read image {folder / 'g0' / 'broken.png'}"):
        TwoCropBatch(cfg.data)(rows)


def test_every_epoch_reads_every_image_once_in_a_new_seeded_order(ray_local, tmp_path):
    (image_folder(tmp_path / "images") / "g0" / "broken.png").unlink()
    cfg = stream_config(tmp_path, "x", 1)
    dataset = pretrain_dataset(image_source(cfg.data, "train"), cfg.data, seed=0, num_workers=WORKERS)
    epochs = [[int(i) for b in dataset.iter_batches(batch_size=None) for i in b["index"]] for _ in range(2)]
    assert all(sorted(order) == list(range(GOOD)) for order in epochs)
    assert epochs[0] != epochs[1] and epochs[0] != sorted(epochs[0])


@pytest.mark.slow
def test_two_worker_stream_run_resumes_at_an_epoch_boundary(ray_local, mlflow_uri, tmp_path):
    image_folder(tmp_path / "images")
    first = stream_config(tmp_path, "streamed", epochs=1)
    run_id, _ = tracking.start_pretrain_run(first)
    ensure_ray()
    result = build_trainer(first, run_id).fit()  # 1 epoch: both workers ran 3 steps in lockstep (gloo) and returned
    assert load_checkpoint(result.checkpoint.path)["global_step"] == 3

    resumed = stream_config(tmp_path, "streamed", epochs=2)  # the same run name: Ray Train resumes its checkpoint
    result = build_trainer(resumed, run_id).fit()
    state = load_checkpoint(result.checkpoint.path)
    assert (state["epoch"], state["global_step"], state["mlflow_run_id"]) == (2, 6, run_id)

    client = MlflowClient(first.tracking.tracking_uri)
    losses = client.get_metric_history(run_id, "loss")
    assert [m.step for m in losses] == [1, 2] and all(np.isfinite(m.value) for m in losses)
    assert [m.value for m in client.get_metric_history(run_id, "corrupt_skipped")] == [1.0, 1.0]
    assert client.get_run(run_id).data.metrics["throughput_img_s"] > 0


def test_device_pipeline_streams_bytes_that_decode_on_the_device(ray_local, tmp_path):
    """``data.pipeline=device``: the stream's tasks only read bytes; the worker decodes and two-crops them (here on
    the CPU), the unreadable file counted as skipped and every batch full."""
    import torch

    from mocolab.data.encoded import DeviceViews
    from mocolab.data.stream import ShardBatches

    image_folder(tmp_path / "images")
    cfg = stream_config(tmp_path, "x", 1, pipeline="device", augment="moco_v2")
    dataset = pretrain_dataset(image_source(cfg.data, "train"), cfg.data, seed=0, num_workers=WORKERS)
    views = DeviceViews("moco_v2", 16, "skip", torch.device("cpu"), BATCH)
    seen, skipped = [], 0
    for batch in ShardBatches(dataset.iterator(), BATCH, seed=0, encoded=True):
        view_q, view_k, index, count = views(batch)
        assert view_q.shape == view_k.shape == (BATCH, 3, 16, 16) and not torch.equal(view_q, view_k)
        seen += index.tolist()
        skipped += count
    assert skipped == 1 and len(seen) == GOOD + 1 and set(seen) <= set(range(GOOD + 1))
