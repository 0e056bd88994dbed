"""The quickstart's config source and its comparison table (the full run is in test_quickstart_run.py)."""

from pathlib import Path

from mocolab.quickstart import QUICKSTART_CONFIG, format_table, quickstart_config

REPO = Path(__file__).resolve().parents[1]


def test_package_config_is_the_experiments_file():
    assert QUICKSTART_CONFIG.resolve() == (REPO / "experiments" / "pretrain" / "quickstart.yaml").resolve()


def test_quickstart_config_is_two_workers_with_shuffle_bn_on_digits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = quickstart_config(seed=7, overrides=["train.epochs=3"])
    assert (cfg.data.dataset, cfg.model.bn, cfg.scaling.num_workers, cfg.scaling.use_gpu) == (
        "digits",
        "shuffle",
        2,
        False,
    )
    assert (cfg.train.seed, cfg.train.epochs) == (7, 3)
    assert cfg.tracking.run_name  # a fresh name per quickstart
    assert cfg.scaling.storage_path == str(tmp_path / "ray_results")  # the default, made absolute at load


def test_table_lists_rows_with_gain_and_dashes_for_missing_values():
    table = format_table([("kNN top-1 (%)", 40.0, 55.5), ("linear top-1 (%)", None, 60.25)])
    header, rule, knn, linear = table.splitlines()
    assert header.split() == ["metric", "random", "init", "MoCo", "gain"]
    assert set(rule) == {"-"}
    assert knn.split()[-3:] == ["40.00", "55.50", "15.50"]
    assert linear.split()[-3:] == ["-", "60.25", "-"]
