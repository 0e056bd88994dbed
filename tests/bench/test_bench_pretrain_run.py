"""Pieces of the benchmark that need no Ray: the timed run's config, epoch timings, the launcher comparison's
ratios, checkpoint costs."""

from __future__ import annotations

import pytest
import torch

from mocolab.bench.fixed import checkpoint_cost, training_state
from mocolab.bench.launcher import LauncherComparison, LauncherTimes
from mocolab.bench.pretrain_run import RUN_EXPERIMENT, EpochTimes, PretrainTimes, bench_run_config, epoch_times
from mocolab.bench.spec import StepSpec, spec_from_config
from mocolab.config import build_config, load_config
from mocolab.quickstart import QUICKSTART_CONFIG

TINY = StepSpec(arch="small_cnn", image_size=12, batch_size=8, dim=16, queue_size=32)


def test_the_timed_run_is_a_short_valid_run_without_monitor_or_evaluations(tmp_path):
    cfg = load_config(QUICKSTART_CONFIG, ["eval.lincls.epochs=1", "train.knn_every=5"])
    raw = bench_run_config(cfg, epochs=2, workdir=tmp_path)
    run = build_config(raw)
    assert (run.train.epochs, run.train.knn_every, run.train.checkpoint_every) == (2, 0, cfg.train.checkpoint_every)
    assert run.eval.lincls is None and run.eval.detection is None
    assert run.tracking.experiment == RUN_EXPERIMENT
    assert run.tracking.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert run.scaling.storage_path == str(tmp_path / "ray_results")
    assert run.model == cfg.model and run.data == cfg.data and run.moco == cfg.moco


def test_epoch_times_drop_the_warm_up_epoch_and_take_periods_between_logging_points():
    # 3 epochs logged at t = 10, 13, 17 s; loops of 2.0, 2.5, 3.0 s at 100, 80, 50 img/s
    times = epoch_times([100.0, 80.0, 50.0], [2.0, 2.5, 3.0], [10.0, 13.0, 17.0])
    assert times == EpochTimes(images=[200, 150], loop_s=[2.5, 3.0], period_s=[3.0, 4.0])
    assert times.img_s == pytest.approx(350 / 7.0) and times.loop_img_s == pytest.approx(350 / 5.5)
    assert times.between_epochs_s == pytest.approx(0.75)
    with pytest.raises(ValueError, match="at least 2 epochs"):
        epoch_times([100.0], [2.0], [10.0])


def test_the_launcher_comparison_pairs_each_rounds_runs():
    def mocolab(period):
        return PretrainTimes(EpochTimes([100, 100], [0.9, 0.9], [period, period]), startup_s=30.0, wall_s=60.0)

    def launcher(period, knn_s):
        return LauncherTimes(EpochTimes([100, 100], [0.9, 0.9], [period, period]), knn_s=knn_s)

    comparison = LauncherComparison(
        [mocolab(1.0), mocolab(1.2), mocolab(1.1)], [launcher(1.0, 0.1), launcher(1.0, 0.2), launcher(1.1, 0.11)]
    )
    ratio = comparison.epoch_ratio()
    assert (ratio.min, ratio.median, ratio.max, ratio.repeats) == pytest.approx((1 / 1.2, 1.0, 1.0, 3))
    assert ratio.noisy  # 1/1.2 is 17 % below the median
    assert comparison.loop_ratio().median == pytest.approx(1.0) and not comparison.loop_ratio().noisy
    assert comparison.knn_vs_epoch().median == pytest.approx(0.1)


def test_spec_of_the_quickstart_is_one_workers_shuffle_bn_step_in_fp32_on_cpu():
    cfg = load_config(QUICKSTART_CONFIG)
    spec = spec_from_config(cfg, "cpu")
    assert (spec.arch, spec.image_size, spec.batch_size, spec.queue_size) == (
        cfg.model.arch,
        cfg.data.image_size,
        cfg.train.batch_size,
        cfg.moco.queue_size,
    )
    assert (spec.bn, spec.precision, spec.channels_last) == ("shuffle", "fp32", False)
    assert spec_from_config(load_config(QUICKSTART_CONFIG, ["train.amp=fp16"]), "cpu").precision == "fp16"
    assert spec_from_config(cfg, "cpu", "bf16").amp == "bf16"


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


def test_spec_copies_every_config_field_it_names_and_sets_the_rest():
    import dataclasses
    import operator

    from mocolab.bench.spec import CONFIG_FIELDS

    cfg = load_config(QUICKSTART_CONFIG, ["moco.temperature=0.3", "train.lr=0.07", "train.seed=5", "moco.dim=32"])
    spec = spec_from_config(cfg, "cpu")
    for field, path in CONFIG_FIELDS.items():
        assert getattr(spec, field) == operator.attrgetter(path)(cfg), field
    set_by_the_function = {"bn", "bn_splits", "precision", "channels_last", "device"}
    assert {f.name for f in dataclasses.fields(StepSpec)} == set(CONFIG_FIELDS) | set_by_the_function
    assert (spec.temperature, spec.lr, spec.seed, spec.dim) == (0.3, 0.07, 5, 32)
