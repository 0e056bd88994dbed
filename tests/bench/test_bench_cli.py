"""``mocolab bench``: the JSON record's keys and types from tiny CPU runs, MLflow logging, bad arguments."""

from __future__ import annotations

import json
import math

import mlflow
import numpy as np
import pytest
from PIL import Image

from mocolab.bench.report import RESULT_KEYS, SHUFFLE_TITLE, SPREAD_KEYS, empty_result, result_table, set_spread
from mocolab.bench.shuffle import ANALYTIC_WORKERS, TIMED_WORKERS, bytes_received_per_worker
from mocolab.bench.spread import Spread
from mocolab.cli import main

# The quickstart config made tiny: 16 images a step, 2 steps timed in each of 2 repetitions.
TINY = ["--set", "train.batch_size=16", "--set", "moco.queue_size=256", "--steps", "2", "--repeats", "2"]
MEASURED_BY = {
    "step": {"step_img_s"},
    "reference": {"step_img_s", "reference_img_s", "ratio_vs_reference"},
    "data": {"step_img_s", "data_img_s_per_worker", "data_vs_step"},
    "profile": {"momentum_queue_fraction", "profile"},
    "launcher": {
        "epoch_img_s",
        "launcher_img_s",
        "epoch_ratio_vs_launcher",
        "loop_ratio_vs_launcher",
        "between_epochs_s",
        "launcher_between_epochs_s",
        "knn_s",
        "knn_vs_epoch",
    },
    "fixed": {"startup_s", "checkpoint_save_s", "checkpoint_load_s", "checkpoint_mb"},
    "shuffle": {"shuffle"},
}


def _run_bench(tmp_path, parts: str, *extra: str) -> dict:
    out = tmp_path / "bench.json"
    assert main(["bench", "--device", "cpu", "--what", parts, "--json", str(out), *TINY, *extra]) == 0
    return json.loads(out.read_text())


def _check_record(record: dict, parts: list[str], repeats: int = 2) -> None:
    measured = set().union(*(MEASURED_BY[p] for p in parts))
    assert set(RESULT_KEYS) <= set(record)
    assert set(record["spread"]) == measured & set(SPREAD_KEYS)
    for key, spread in record["spread"].items():
        assert spread["min"] <= spread["median"] == record[key] <= spread["max"]
        assert spread["repeats"] == (repeats if key in MEASURED_BY["launcher"] else 2)
    for key in RESULT_KEYS:
        if key not in measured:
            assert record[key] is None, key
        elif key == "profile":
            assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in record[key].values())
            assert sum(record[key].values()) <= 1.0 + 1e-9
        elif key == "shuffle":
            assert [row["workers"] for row in record[key]] == list(ANALYTIC_WORKERS)
        else:
            assert isinstance(record[key], float), key
    positive = measured & {
        "step_img_s",
        "reference_img_s",
        "ratio_vs_reference",
        "data_img_s_per_worker",
        "epoch_img_s",
        "launcher_img_s",
        "epoch_ratio_vs_launcher",
        "loop_ratio_vs_launcher",
        "knn_s",
        "knn_vs_epoch",
        "startup_s",
        "checkpoint_mb",
    }
    assert all(record[k] > 0 for k in positive)
    assert record["settings"]["device"] == "cpu" and record["settings"]["arch"] == "small_cnn"
    assert record["settings"]["bn"] == "shuffle"  # the quickstart's 2-worker shuffle-BN, one worker's share


def test_bench_step_reference_data_and_profile_write_their_keys_as_fractions(tmp_path, capsys):
    record = _run_bench(tmp_path, "step,reference,data,profile")
    _check_record(record, ["step", "reference", "data", "profile"])
    assert record["momentum_queue_fraction"] == pytest.approx(
        record["profile"]["momentum_update"] + record["profile"]["queue_update"]
    )
    table = capsys.readouterr().out
    assert "ratio_vs_reference" in table and "profile.backward" in table and "x2 +-" in table


@pytest.mark.slow
def test_bench_launcher_and_fixed_costs_time_real_two_worker_runs_in_alternation(tmp_path):
    record = _run_bench(
        tmp_path,
        "launcher,fixed",
        "--rounds",
        "2",
        "--epochs",
        "2",
        "--set",
        "data.digits.copies=1",
        "--set",
        "data.digits.test_fraction=0.5",
    )
    _check_record(record, ["launcher", "fixed"], repeats=2)
    assert record["between_epochs_s"] >= 0 and record["launcher_between_epochs_s"] >= 0


def test_the_table_withholds_the_verdict_on_a_ratio_whose_repetitions_disagree():
    result = empty_result()
    set_spread(result, "epoch_ratio_vs_launcher", Spread.of([0.90, 0.97, 1.02]))
    set_spread(result, "ratio_vs_reference", Spread.of([1.05, 1.06, 1.07]))
    table = result_table(result)
    (noisy,) = [line for line in table.splitlines() if line.startswith("epoch_ratio_vs_launcher")]
    assert "0.970 [0.900, 1.020] x3 +-7.2%" in noisy and "too noisy for a verdict" in noisy and "ok" not in noisy
    (quiet,) = [line for line in table.splitlines() if line.startswith("ratio_vs_reference")]
    assert quiet.endswith("ok")
    assert table.splitlines()[-1].startswith("the machine is too noisy for a verdict on epoch_ratio_vs_launcher:")
    result["spread"]["epoch_ratio_vs_launcher"] = Spread.of([0.93, 0.94, 0.95]).as_dict()
    result["epoch_ratio_vs_launcher"] = 0.94
    assert "MISS" in result_table(result) and "too noisy" not in result_table(result)


def test_bench_shuffle_gives_bytes_for_2_to_64_workers_beside_times_on_2_and_4_gloo_processes(tmp_path, capsys):
    record = _run_bench(tmp_path, "shuffle")
    _check_record(record, ["shuffle"])
    batch, size, dim = 16, 16, 128  # TINY's batch, the quickstart's image size and dim
    for row in record["shuffle"]:
        w = row["workers"]
        assert row["gather_bytes"] == round(bytes_received_per_worker("gather", w, batch, size, dim))
        assert row["all_to_all_bytes"] == round(bytes_received_per_worker("all_to_all", w, batch, size, dim))
        assert row["bytes_ratio"] == pytest.approx(row["all_to_all_bytes"] / row["gather_bytes"], rel=1e-4)
        timed = [row["gather_s"], row["all_to_all_s"], row["time_ratio"]]
        if w in TIMED_WORKERS:
            assert all(isinstance(v, float) and v > 0 for v in timed)
            assert row["time_ratio"] == pytest.approx(row["all_to_all_s"] / row["gather_s"])
        else:
            assert timed == [None, None, None]
    out = capsys.readouterr().out
    assert SHUFFLE_TITLE in out and "bytes_ratio" in out


def test_bench_logs_a_run_tagged_stage_bench_to_mlflow(tmp_path, mlflow_uri):
    record = _run_bench(tmp_path, "step,reference", "--mlflow")
    runs = mlflow.search_runs(experiment_names=["quickstart"], filter_string="tags.`mocolab.stage` = 'bench'")
    assert len(runs) == 1
    assert runs.iloc[0]["metrics.step_img_s"] == pytest.approx(record["step_img_s"])
    spread = record["spread"]["ratio_vs_reference"]
    assert runs.iloc[0]["metrics.ratio_vs_reference_min"] == pytest.approx(spread["min"])
    assert runs.iloc[0]["metrics.ratio_vs_reference_max"] == pytest.approx(spread["max"])
    assert runs.iloc[0]["params.bench.arch"] == "small_cnn"


def test_bench_refuses_an_unknown_part_naming_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--what", "step,speed"])
    expected = "unknown part(s) ['speed']; choose from step,reference,data,launcher,fixed,profile,shuffle"
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "1"], "--epochs=1 must be >= 2"),
        (["--steps", "0"], "--steps=0 must be >= 1"),
        (["--set", "moco.mechanism=end_to_end"], "the step benchmark covers moco.mechanism=moco"),
        (["--what", "data", "--images", "/nonexistent/photos"], "--images /nonexistent/photos: not a folder"),
        (["--what", "data", "--step-rate", "0"], "--step-rate=0.0 must be > 0"),
    ],
)
def test_bench_refuses_settings_it_cannot_run_before_measuring(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def test_bench_data_tables_each_pipeline_and_recipe_with_cores_per_gpu(tmp_path, capsys):
    images = tmp_path / "photos"
    images.mkdir()
    for i, colour in enumerate(((200, 40, 40), (30, 160, 90))):
        pixels = np.random.default_rng(i).integers(0, 40, (300, 280, 3)) + np.array(colour)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(images / f"{i}.jpg", quality=90)
    record = _run_bench(
        tmp_path, "data", "--images", str(images), "--image-size", "64", "--data-images", "8", "--step-rate", "1000"
    )
    rows = record["data_pipelines"]["rows"]
    assert [(r["pipeline"], r["augment"]) for r in rows] == [
        (p, a) for a in ("moco_v1", "moco_v2") for p in ("albumentations", "fast_cpu", "device_host", "device_on_cpu")
    ]
    for row in rows:
        rate = row["img_per_s_per_core"]
        assert row["image_size"] == 64 and 0 < rate["min"] <= rate["median"] <= rate["max"]
        assert row["cores_per_gpu"] == math.ceil(1000 / rate["median"])
        ratio = row["speedup"]
        assert 0 < ratio["min"] <= ratio["median"] <= ratio["max"]
        if row["pipeline"] == "albumentations":  # the baseline's per-round ratio to itself
            assert ratio == {"median": 1.0, "min": 1.0, "max": 1.0}
    assert "cores/GPU" in capsys.readouterr().out
