"""``mocolab reproduce`` end to end on a tiny claim: Ray trials, MLflow parent/child runs, verdict tags, report,
and ``--resume`` reading a finished reproduction back without training again."""

import pytest
import yaml
from mlflow import MlflowClient

from mocolab import tracking
from mocolab.cli import main
from mocolab.config import ConfigError
from mocolab.reproduce.claims import CLAIMS_DIR
from mocolab.reproduce.run import plan_claim


def tiny_claim(folder):
    claim = {
        "claim": "tiny",
        "title": "Tiny momentum",
        "paper": {"source": "none", "rows": [{"setting": {"moco.momentum": 0.99}, "value": 57.8}]},
        "departures": "tiny",
        "chosen": "for the test",
        "sweep": {
            "base": {
                "config": str(CLAIMS_DIR / "configs" / "digits_v1.yaml"),
                "data.limit_train": 256,
                "data.limit_test": 128,
                "train.epochs": 1,
                "train.batch_size": 32,
                "moco.queue_size": 64,
                "train.knn_every": 1,
                "train.linear_probe": True,
                "train.checkpoint_every": 1,
            },
            "space": {"moco.momentum": {"grid": [0.0, 0.99]}},
            "seeds": [0, 1],
            "resources": {"workers": 1, "cpus_per_worker": 1},
            "max_concurrent_trials": 2,
        },
        "checks": [
            {"name": "0.99 beats 0", "a": {"moco.momentum": 0.99}, "relation": ">", "b": {"moco.momentum": 0.0}}
        ],
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(claim, sort_keys=False))
    return path


def test_a_check_on_a_metric_the_trials_do_not_log_is_refused_before_any_run(tmp_path, mlflow_uri):
    path = tiny_claim(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["metric"] = "lincls_fast_top1"
    raw["sweep"]["base"]["train.linear_probe"] = False
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="uses lincls_fast_top1, which the trials do not log; set train.linear_probe"):
        plan_claim(str(path), "rep", None, [], "reproduce")
    plan = plan_claim(str(path), "rep", None, ["train.linear_probe=true"], "reproduce")
    assert all(t.train.linear_probe for t in plan.trials)


@pytest.mark.slow
def test_reproduce_tiny_claim_end_to_end(ray_local, mlflow_uri, tmp_path, capsys):
    path = tiny_claim(tmp_path)
    out = tmp_path / "report"
    assert main(["reproduce", str(path), "--out", str(out), "--set", f"scaling.storage_path={tmp_path / 'ray'}"]) == 0
    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("reproduce")
    parents = client.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.STAGE_TAG}` = 'reproduce'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    sweeps = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{tracking.PARENT_RUN_TAG}` = '{parent.info.run_id}'"
    )
    assert len(sweeps) == 1
    sweep = sweeps[0]
    assert sweep.data.tags[tracking.CLAIM_TAG] == "tiny"
    assert sweep.data.tags[tracking.VERDICT_TAG] in ("reproduced", "not_reproduced", "inconclusive")
    trials = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{tracking.PARENT_RUN_TAG}` = '{sweep.info.run_id}'"
    )
    assert len(trials) == 4 and all(t.info.status == "FINISHED" for t in trials)
    assert [m.step for m in client.get_metric_history(sweep.info.run_id, "random_init_knn_top1")] == [0, 1]
    assert [m.step for m in client.get_metric_history(sweep.info.run_id, "random_init_lincls_fast_top1")] == [0, 1]
    assert all({"lincls_fast_top1", "linear_probe_time_s"} <= set(t.data.metrics) for t in trials)
    text = (out / "report.md").read_text()
    assert "## Tiny momentum (`tiny`)" in text and "57.8" in text and (out / "tiny.png").is_file()
    assert "linear probe top-1" in text and "random init (same seeds)" in text
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/tiny.png"} <= logged
    printed = capsys.readouterr().out
    assert "expected total" in printed

    # --resume of the finished reproduction reads the sweep back: no new trial runs, the same verdict
    again = tmp_path / "again"
    assert (
        main(
            [
                "reproduce",
                "--resume",
                "--out",
                str(again),
                "--set",
                f"scaling.storage_path={tmp_path / 'ray'}",
                str(path),
            ]
        )
        == 0
    )
    assert "already finished" in capsys.readouterr().out
    trials_after = client.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.STAGE_TAG}` = 'pretrain'")
    assert len(trials_after) == 4
    assert (again / "report.md").read_text().split("## Summary")[1] == text.split("## Summary")[1]


def test_dry_run_validates_and_prints_the_plan(mlflow_uri, tmp_path, capsys):
    path = tiny_claim(tmp_path)
    assert main(["reproduce", str(path), "--dry-run", "--seeds", "3"]) == 0
    printed = capsys.readouterr().out
    assert "tiny" in printed and "6 trials" in printed and "expected total" in printed


def test_bad_claim_is_refused_before_anything_runs(mlflow_uri, tmp_path, capsys):
    path = tiny_claim(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["sweep"]["base"]["moco.queue_size"] = 100  # not a multiple of the batch
    path.write_text(yaml.safe_dump(raw))
    assert main(["reproduce", str(path), "--dry-run"]) == 2
    assert "moco.queue_size=100" in capsys.readouterr().err
    assert main(["reproduce", "no-such-claim", "--dry-run"]) == 2
    assert "no claim 'no-such-claim'" in capsys.readouterr().err


def tiny_detection_claim(folder):
    """MoCo init against random init on the made digits VOC set: 1 epoch on 256 images, 4 detection iterations,
    seed 1."""
    path = tiny_claim(folder)
    raw = yaml.safe_load(path.read_text())
    raw["sweep"]["base"].update(
        {
            "train.linear_probe": False,
            "eval": {
                "detection": {
                    "data": {"format": "voc", "made_digits": True},
                    "fpn": False,
                    "min_size": 64,
                    "max_size": 64,
                    "anchor_sizes": [8, 16, 32, 64],
                    "iterations": 4,
                    "batch_size": 2,
                    "lr": 0.005,
                    "warmup_iters": 2,
                    "clip_grad_norm": 20,
                    "roi_batch_size": 32,
                    "test_proposals": 20,
                    "num_workers": 1,
                }
            },
        }
    )
    raw["sweep"]["space"] = {"train.epochs": {"grid": [1]}}
    raw["sweep"]["seeds"] = [1]  # not the default 0: the detection seed follows it
    raw["paper"]["rows"] = []
    raw.update(metric="det_AP", all_runs_finish=True)
    raw["checks"] = [{"name": "MoCo beats random init", "a": {"train.epochs": 1}, "relation": ">", "b": "random_init"}]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.slow
def test_reproduce_tiny_detection_claim_end_to_end(ray_local, mlflow_uri, tmp_path):
    path = tiny_detection_claim(tmp_path)
    out = tmp_path / "report"
    assert main(["reproduce", str(path), "--out", str(out), "--set", f"scaling.storage_path={tmp_path / 'ray'}"]) == 0
    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("reproduce")
    sweep = client.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.CLAIM_TAG}` = 'tiny'")[0]
    assert [m.step for m in client.get_metric_history(sweep.info.run_id, "random_init_det_AP")] == [1]
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.STAGE_TAG}` = 'detection'")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)  # the MoCo trial's and random init's
    seeds = sorted((r.data.tags[tracking.INIT_TAG] == "random", r.data.params["eval.detection.seed"]) for r in runs)
    assert seeds == [(False, "1"), (True, "1")]
    text = (out / "report.md").read_text()
    assert "every run reaches its last iteration with a finite loss | 2 of 2 runs finished" in text
    assert "AP (verdict)" in text
