"""Analysis on a synthetic MLflow store: ablation tables (mean ± std over seeds), best trial, K per
mechanism, the report command's files and its log to the sweep's parent run."""

from __future__ import annotations

import math

import pytest
from analysis_store import MECHANISM_KNN, MOMENTUM_KNN, make_store
from mlflow import MlflowClient

from mocolab.analysis import runs, summary, tables
from mocolab.commands.report import add_arguments, main
from mocolab.config import ConfigError


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One synthetic store for the module (a fresh sqlite store costs seconds): both sweeps."""
    return make_store(tmp_path_factory.mktemp("mlflow"))


def test_mean_std_formatting():
    assert tables.mean_std(58.8, 0.42) == "58.8 ± 0.4"
    assert tables.mean_std(58.8, float("nan")) == "58.8"
    assert tables.mean_std(float("nan"), float("nan")) == "-"


def test_momentum_table_has_one_row_per_value_with_mean_and_std_over_seeds(store):
    parent, frame = runs.load_sweep_runs(store, "momentum_test")
    assert runs.sweep_axes(parent) == ["moco.momentum"]
    s = summary.summarize(frame, "t", axes=runs.sweep_axes(parent))
    assert s.failed == 1 and len(s.runs) == 8
    assert s.metrics == ["knn_top1", "lincls_top1"]
    assert list(s.table["moco.momentum"]) == sorted(MOMENTUM_KNN)
    for _, row in s.table.iterrows():
        knns = MOMENTUM_KNN[row["moco.momentum"]]
        assert row["n"] == 2
        assert row["knn_top1_mean"] == pytest.approx(sum(knns) / 2)
        assert row["knn_top1_std"] == pytest.approx(abs(knns[0] - knns[1]) / math.sqrt(2))
        assert row["lincls_top1_mean"] == pytest.approx(knns[0] + 5) and math.isnan(row["lincls_top1_std"])
    assert list(s.display["knn_top1"]) == ["37.0 ± 1.4", "44.5 ± 0.7", "53.0 ± 0.0", "59.0 ± 1.4"]
    assert s.best["params.moco.momentum"] == "0.999" and s.best["metrics.knn_top1"] == 60.0


def test_axes_are_inferred_from_the_params_that_vary(store):
    frame = runs.load_experiment_runs(store, "sweeps")
    momentum_runs = frame[frame["tags.mocolab.sweep"] == "momentum_test"]
    assert tables.varying_params(tables.finished(momentum_runs)) == ["moco.momentum"]


def test_mechanism_sweep_groups_by_mechanism_and_k(store):
    parent, frame = runs.load_sweep_runs(store, "mechanism_test")
    s = summary.summarize(frame, "t", axes=runs.sweep_axes(parent))
    assert s.is_mechanism_comparison
    grid = s.mechanism_grid()
    assert list(grid.columns) == ["end_to_end", "memory_bank", "moco"]
    assert grid.loc["1024", "moco"] == "53.0 ± 1.4"
    assert grid.loc["32", "end_to_end"] == "41.0 ± 1.4" and grid.loc["32", "moco"] == "-"
    assert len(s.table) == len(MECHANISM_KNN)


def test_report_command_writes_table_plots_markdown_and_logs_to_the_parent(store, tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "rep"
    assert main(parser.parse_args(["momentum_test", "--out", str(out), "--tracking-uri", store])) == 0
    printed = capsys.readouterr().out
    assert "59.0 ± 1.4" in printed and "0.999" in printed
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "ablation.csv", "ablation_knn_top1.png", "learning_curves.png"} <= names
    assert (out / "ablation_knn_top1.png").read_bytes()[:4] == b"\x89PNG"
    assert "| moco.momentum | knn_top1 | lincls_top1 | n |" in (out / "report.md").read_text()
    parent = runs.find_sweep_parent(store, "momentum_test")
    logged = {a.path for a in MlflowClient(tracking_uri=store).list_artifacts(parent["run_id"], "report")}
    assert "report/report.md" in logged and "report/ablation_knn_top1.png" in logged


def test_report_of_mechanism_sweep_plots_accuracy_against_k(store, tmp_path):
    from mocolab.analysis.report import make_report

    s, out = make_report(store, sweep="mechanism_test", out=tmp_path / "m")
    assert (out / "accuracy_vs_k.png").is_file()
    assert "| K | end_to_end | memory_bank | moco |" in (out / "report.md").read_text()


def test_unknown_sweep_or_metric_is_a_clear_error(store, tmp_path):
    from mocolab.analysis.report import make_report

    with pytest.raises(ConfigError, match="no sweep named 'nope'"):
        make_report(store, sweep="nope")
    with pytest.raises(ConfigError, match="det_AP"):
        make_report(store, sweep="momentum_test", metrics=["det_AP"], out=tmp_path / "x")
    with pytest.raises(ConfigError, match="no experiment named 'nope'"):
        make_report(store, experiment="nope")


def test_comparison_lists_the_params_that_differ_and_the_metrics(store):
    frame = runs.load_experiment_runs(store, "sweeps")
    frame = frame[frame["tags.mocolab.sweep"] == "momentum_test"]
    table = summary.comparison(frame)
    assert list(table.columns) == ["run", "status", "moco.momentum", "train.seed", "knn_top1", "lincls_top1"]
    assert len(table) == 9 and set(table["status"]) == {"FINISHED", "FAILED"}
