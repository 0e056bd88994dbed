"""Overhead and fixed-cost pieces of the benchmark that need no Ray: the timed run's config, the overhead
fraction, checkpoint costs."""

from __future__ import annotations

import pytest
import torch

from mocolab.bench.fixed import checkpoint_cost, training_state
from mocolab.bench.overhead import RUN_EXPERIMENT, bench_run_config, platform_overhead, serial_data_throughput
from mocolab.bench.spec import StepSpec, spec_from_config
from mocolab.config import build_config, load_config
from mocolab.quickstart import QUICKSTART_CONFIG

TINY = StepSpec(arch="small_cnn", image_size=12, batch_size=8, dim=16, queue_size=32)


def test_the_timed_run_is_a_short_valid_run_without_monitor_or_evaluations(tmp_path):
    cfg = load_config(QUICKSTART_CONFIG, ["eval.lincls.epochs=1", "train.knn_every=5"])
    raw = bench_run_config(cfg, epochs=2, workdir=tmp_path)
    run = build_config(raw)
    assert (run.train.epochs, run.train.knn_every, run.train.checkpoint_every) == (2, 0, 2)
    assert run.eval.lincls is None and run.eval.detection is None
    assert run.tracking.experiment == RUN_EXPERIMENT
    assert run.tracking.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert run.scaling.storage_path == str(tmp_path / "ray_results")
    assert run.model == cfg.model and run.data == cfg.data and run.moco == cfg.moco


def test_platform_overhead_is_the_fraction_of_bare_throughput_lost():
    assert platform_overhead(95.0, 100.0) == pytest.approx(0.05)
    assert platform_overhead(110.0, 100.0) == pytest.approx(-0.10)
    with pytest.raises(ValueError, match="must be > 0"):
        platform_overhead(1.0, 0.0)


def test_serial_data_throughput_adds_the_loading_time_of_every_image_to_its_step_time():
    # 2 workers stepping 100 img/s together (20 ms an image), each loading 200 img/s (5 ms an image, 2.5 for two)
    assert serial_data_throughput(100.0, 200.0, workers=2) == pytest.approx(1 / (0.01 + 0.0025))
    assert serial_data_throughput(100.0, 1e12, workers=2) == pytest.approx(100.0)


def test_spec_of_the_quickstart_is_one_workers_shuffle_bn_step_in_fp32_on_cpu():
    cfg = load_config(QUICKSTART_CONFIG)
    spec = spec_from_config(cfg, "cpu")
    assert (spec.arch, spec.image_size, spec.batch_size, spec.queue_size) == (
        cfg.model.arch, cfg.data.image_size, cfg.train.batch_size, cfg.moco.queue_size
    )
    assert (spec.bn, spec.precision, spec.channels_last) == ("shuffle", "fp32", False)
    with pytest.raises(ValueError, match="precision bf16 is for CUDA devices"):
        spec_from_config(cfg, "cpu", "bf16")


def test_checkpoint_holds_the_training_loops_contents_and_is_timed(tmp_path):
    torch.set_num_threads(1)
    state = training_state(TINY, {"moco": {"dim": 16}})
    assert {"model", "optimizer", "scheduler", "epoch", "global_step", "rng", "mlflow_run_id", "config"} <= set(state)
    assert "dictionary.queue" in state["model"] and state["optimizer"]["state"]  # momentum buffers exist
    cost = checkpoint_cost(TINY, {"moco": {"dim": 16}}, directory=tmp_path)
    assert cost.save_s > 0 and cost.load_s > 0
    params = sum(v.numel() * v.element_size() for v in state["model"].values())
    assert cost.size_mb > params / 1e6  # model + optimizer buffers
    assert list(tmp_path.iterdir()) == []  # the temporary checkpoint is gone
