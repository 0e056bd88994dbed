"""Sweep files: parsing, per-trial configs and refusal of bad sweeps before anything runs (no Ray)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml

from mocolab.config import ConfigError, read_yaml
from mocolab.tune.spec import assignment_of, base_raw, load_sweep, parse_sweep, trial_config

SWEEPS = Path(__file__).resolve().parents[2] / "experiments" / "sweeps"

BASE = {
    "moco": {"queue_size": 64, "dim": 16},
    "model": {"arch": "small_cnn"},
    "train": {"epochs": 1, "batch_size": 16},
}


def write_sweep(tmp_path: Path, **fields) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    sweep = {"name": "t", "base": "base.yaml", **fields}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_base_path_is_relative_to_the_sweep_file_and_inline_overrides_merge(tmp_path, monkeypatch):
    path = write_sweep(tmp_path, space={"moco.momentum": {"grid": [0.9, 0.99]}})
    path.write_text(
        path.read_text().replace("base: base.yaml", "base: {config: base.yaml, train.epochs: 3, moco: {dim: 8}}")
    )
    monkeypatch.chdir("/")
    spec, base, (first, *_) = load_sweep(path, overrides=["train.lr=0.1"])
    assert spec.axes == ["moco.momentum"]
    assert base["train"] == {"epochs": 3, "batch_size": 16, "lr": 0.1}
    assert base["moco"] == {"queue_size": 64, "dim": 8}
    assert first.moco.momentum == 0.9
    # trials run in their own directories: the store and Ray storage are absolute (the defaults included)
    assert base["scaling"]["storage_path"] == "/ray_results" == first.scaling.storage_path
    assert base["tracking"]["tracking_uri"].startswith("sqlite:////")


def test_one_worker_trials_use_split_batchnorm_and_resources_set_scaling(tmp_path):
    spec, base, _ = load_sweep(write_sweep(tmp_path, resources={"workers": 1, "cpus_per_worker": 2}))
    cfg = trial_config(spec, base, {"moco.temperature": 0.1}, run_name="t-00000")
    assert cfg.model.bn == "split"
    assert (cfg.scaling.num_workers, cfg.scaling.cpus_per_worker, cfg.scaling.use_gpu) == (1, 2, False)
    assert cfg.tracking.run_name == "t-00000" and cfg.moco.temperature == 0.1
    two = load_sweep(write_sweep(tmp_path, resources={"workers": 2}))
    assert trial_config(two[0], two[1], {}, run_name="x").model.bn == "shuffle"


def test_evals_select_the_eval_sections(tmp_path):
    spec, base, _ = load_sweep(write_sweep(tmp_path, evals=["lincls"]))
    cfg = trial_config(spec, base, {}, run_name="x")
    assert cfg.eval.lincls is not None and cfg.eval.detection is None


def test_zipped_axis_sets_several_keys(tmp_path):
    space = {"moco.mechanism, train.batch_size": {"grid": [["end_to_end", 8], ["moco", 16]]}}
    spec, base, (first, *_) = load_sweep(write_sweep(tmp_path, space=space))
    assert spec.axes == ["moco.mechanism", "train.batch_size"]
    assert (first.moco.mechanism, first.train.batch_size) == ("end_to_end", 8)


def test_unknown_key_in_the_space_is_refused_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"moco\.tempreature"):
        load_sweep(write_sweep(tmp_path, space={"moco.tempreature": {"grid": [0.1]}}))


def test_unknown_sweep_field_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'sedes'"):
        load_sweep(write_sweep(tmp_path, sedes=[0, 1]))


def test_queue_not_a_multiple_of_the_batch_is_refused_naming_the_value(tmp_path):
    path = write_sweep(tmp_path, space={"moco.queue_size": {"grid": [64, 100]}})
    with pytest.raises(ConfigError, match=r"moco\.queue_size=100 is not a multiple"):
        load_sweep(path)


def test_memory_bank_drawing_more_negatives_than_images_is_refused_by_the_preflight(tmp_path, monkeypatch):
    from mocolab.preflight import preflight

    monkeypatch.chdir(tmp_path)
    space = {"moco.mechanism, moco.queue_size": {"grid": [["memory_bank", 64], ["memory_bank", 4096]]}}
    _, _, checked = load_sweep(write_sweep(tmp_path, space=space), overrides=["data.limit_train=100"])
    with pytest.raises(ConfigError, match=r"moco\.queue_size=4096 negatives .* the memory bank has 100 images"):
        preflight(checked)


def test_impossible_bound_of_a_continuous_axis_is_refused(tmp_path):
    path = write_sweep(tmp_path, search="random", space={"moco.momentum": {"uniform": [0.5, 1.5]}})
    with pytest.raises(ConfigError, match=r"moco\.momentum=1\.5"):
        load_sweep(path)


def test_grid_search_refuses_continuous_axes(tmp_path):
    with pytest.raises(ConfigError, match="use search: random"):
        load_sweep(write_sweep(tmp_path, space={"moco.temperature": {"loguniform": [0.05, 0.5]}}))


def test_axis_needs_exactly_one_kind_and_sane_bounds(tmp_path):
    with pytest.raises(ConfigError, match="exactly one"):
        load_sweep(write_sweep(tmp_path, space={"moco.temperature": {"grid": [0.1], "choice": [0.2]}}))
    with pytest.raises(ConfigError, match="lo < hi"):
        load_sweep(write_sweep(tmp_path, search="random", space={"moco.temperature": {"uniform": [0.5, 0.1]}}))


def test_seed_and_tracking_keys_cannot_be_swept(tmp_path):
    with pytest.raises(ConfigError, match="seeds:"):
        load_sweep(write_sweep(tmp_path, space={"train.seed": {"grid": [0, 1]}}))
    with pytest.raises(ConfigError, match="tracking"):
        load_sweep(write_sweep(tmp_path, space={"tracking.experiment": {"grid": ["a"]}}))


def test_asha_needs_knn_every_epoch(tmp_path):
    path = write_sweep(tmp_path, scheduler={"type": "asha", "grace_period": 1})
    assert load_sweep(path)[0].scheduler.type == "asha"
    with pytest.raises(ConfigError, match="knn_every=1"):
        load_sweep(path, overrides=["train.knn_every=2"])
    folder = ["data.dataset=folder", f"data.root={tmp_path}"]  # no labels: no knn_top1 to compare
    with pytest.raises(ConfigError, match="set train.knn_dataset"):
        load_sweep(path, overrides=folder)
    assert load_sweep(path, overrides=[*folder, "train.knn_dataset={dataset: digits}"])


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*_cpu.yaml")), ids=lambda p: p.name)
def test_shipped_cpu_sweeps_validate(path):
    spec, _, (first, *_) = load_sweep(path)
    assert spec.name == path.stem and first.scaling.use_gpu is False


@pytest.mark.parametrize(
    "path", sorted(p for p in SWEEPS.glob("*.yaml") if not p.stem.endswith("_cpu")), ids=lambda p: p.name
)
def test_shipped_gpu_sweeps_give_valid_trial_configs(path, tmp_path):
    """Every grid point of the cluster sweeps is a valid run config (ImageNet replaced by an empty folder)."""
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
    spec = parse_sweep(read_yaml(path))
    assert spec.name == path.stem and spec.resources.gpus_per_worker == 1
    base = base_raw(spec, path.parent, [f"data.root={tmp_path}"])
    for combo in itertools.product(*[[(k, v) for v in axis.values] for k, axis in spec.space.items()]):
        assignment = {key: value for k, v in combo for key, value in assignment_of(k, v).items()}
        cfg = trial_config(spec, base, assignment, run_name="check")
        assert cfg.scaling.use_gpu and cfg.scaling.num_workers == spec.resources.workers


def test_tune_space_counts_and_unzips_trials(tmp_path):
    from ray import tune

    from mocolab.tune.sweep import assignment_from, count_trials, param_space, trial_run_name

    space = {"moco.temperature": {"choice": [0.1, 0.2]}, "moco.mechanism, train.batch_size": {"grid": [["moco", 16]]}}
    spec, _, _ = load_sweep(write_sweep(tmp_path, space=space, seeds=[0, 1], num_samples=2))
    tune_space = param_space(spec)
    assert tune_space["moco.temperature"] == tune.grid_search([0.1, 0.2])  # grid search enumerates choices
    assert tune_space["train.seed"] == tune.grid_search([0, 1])
    assert count_trials(spec) == 2 * 1 * 2 * 2
    params = {"moco.temperature": 0.1, "moco.mechanism, train.batch_size": ["moco", 16], "train.seed": 1}
    assert assignment_from(params) == {
        "moco.temperature": 0.1,
        "moco.mechanism": "moco",
        "train.batch_size": 16,
        "train.seed": 1,
    }
    assert trial_run_name("s", "3f2a1_00012") == "s-00012"


def test_optuna_search_is_refused_with_the_fix_when_optuna_is_missing(tmp_path, monkeypatch):
    import importlib.util

    space = {"moco.temperature": {"choice": [0.1, 0.2]}}
    assert load_sweep(write_sweep(tmp_path, search="optuna", space=space))  # optuna is a pinned dependency
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else find_spec(name, *a))
    with pytest.raises(ConfigError, match="pip install optuna"):
        load_sweep(write_sweep(tmp_path, search="optuna", space=space))
