"""Claim files, their evidence (runs -> paired values -> verdicts) and the report, on synthetic runs (no Ray)."""

import math

import pandas as pd
import pytest

from mocolab.analysis.verdict import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED
from mocolab.config import ConfigError
from mocolab.reproduce.claims import CLAIMS_DIR, list_claims, load_claim, parse_claim, same_value
from mocolab.reproduce.evidence import by_seed, evaluate_claim, rows_table, settings_of_runs
from mocolab.reproduce.report import ClaimReport, _short, write_report

CONFIG = str(CLAIMS_DIR / "configs" / "digits_v1.yaml")


def raw_claim(**extra):
    raw = {
        "claim": "toy",
        "title": "Toy momentum",
        "paper": {"source": "a table", "rows": [{"setting": {"moco.momentum": 0.9}, "value": 55.2}]},
        "departures": "small",
        "chosen": "before",
        "sweep": {
            "base": {"config": CONFIG},
            "space": {"moco.momentum": {"grid": [0.0, 0.9, 0.99]}},
            "seeds": [0, 1, 2],
        },
        "checks": [
            {"name": "0.99 beats 0.9", "a": {"moco.momentum": 0.99}, "relation": ">", "b": {"moco.momentum": 0.9}},
            {
                "name": "m=0 at most random init",
                "a": {"moco.momentum": 0.0},
                "relation": "<=",
                "b": "random_init",
                "margin": 2.0,
            },
            {
                "name": "m=0 loss near chance",
                "a": {"moco.momentum": 0.0},
                "metric": "loss_to_chance",
                "relation": ">=",
                "b": 0.9,
            },
        ],
    }
    raw.update(extra)
    return raw


def runs_frame(knn: dict, loss: dict, status: dict | None = None) -> pd.DataFrame:
    """An mlflow.search_runs-like frame: knn/loss map (momentum, seed) -> final value."""
    rows = []
    for (momentum, seed), value in knn.items():
        rows.append(
            {
                "run_id": f"r{momentum}-{seed}",
                "status": (status or {}).get((momentum, seed), "FINISHED"),
                "params.moco.momentum": str(momentum),
                "params.train.seed": str(seed),
                "params.moco.mechanism": "moco",
                "params.moco.queue_size": "1024",
                "params.train.batch_size": "64",
                "params.scaling.num_workers": "1",
                "params.negatives": "1024",
                "metrics.knn_top1": value,
                "metrics.loss": loss[(momentum, seed)],
            }
        )
    return pd.DataFrame(rows)


KNN = {(0.0, s): v for s, v in enumerate([40.0, 41.0, 39.5])}
KNN.update({(0.9, s): v for s, v in enumerate([50.0, 53.0, 48.0])})
KNN.update({(0.99, s): v for s, v in enumerate([70.0, 72.0, 69.0])})
LOSS = {key: (6.9 if key[0] == 0.0 else 4.5) for key in KNN}
BASELINES = pd.DataFrame({"knn_top1": {0: 46.0, 1: 45.0, 2: 47.0}})


def test_committed_claims_load_and_validate():
    names = list_claims()
    assert {"momentum", "dictionary", "mechanisms", "bn", "v2", "temperature"} <= set(names)
    for name in names:
        claim, spec, path = load_claim(name)
        assert claim.claim == path.stem and len(spec.seeds) >= 3 and claim.checks


def test_bad_claims_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"checks\[0\].a=.*selects no trial"):
        parse_claim(raw_claim(checks=[{"name": "x", "a": {"moco.momentum": 0.5}, "relation": ">", "b": 1.0}]), "toy")
    with pytest.raises(ConfigError, match="relation"):
        parse_claim(raw_claim(checks=[{"name": "x", "a": {"moco.momentum": 0.9}, "relation": "!=", "b": 1.0}]), "toy")
    with pytest.raises(ConfigError, match="sweep.name"):
        parse_claim(raw_claim(sweep={"name": "mine", "space": {}}), "toy")
    with pytest.raises(ConfigError, match="random_init compares knn_top1, lincls_fast_top1"):
        parse_claim(
            raw_claim(
                checks=[
                    {"name": "x", "a": {"moco.momentum": 0.9}, "metric": "loss", "relation": "<=", "b": "random_init"}
                ]
            ),
            "toy",
        )
    with pytest.raises(ConfigError, match="grid axes"):
        parse_claim(raw_claim(sweep={"space": {"moco.momentum": {"uniform": [0.9, 0.99]}}, "search": "random"}), "toy")


def test_named_values_are_resolved_for_the_trials_and_kept_for_labels():
    ops = [{"op": "RandomResizedCrop", "scale": [0.4, 1.0]}]
    raw = raw_claim(
        values={"data.augment": {"crop": ops}},
        sweep={
            "base": {"config": CONFIG},
            "seeds": [0, 1],
            "space": {"moco.momentum, data.augment": {"grid": [[0.9, "crop"], [0.99, "crop"]]}},
        },
        checks=[
            {
                "name": "x",
                "a": {"moco.momentum": 0.99, "data.augment": "crop"},
                "relation": ">",
                "b": {"moco.momentum": 0.9},
            }
        ],
        paper={"source": "s", "rows": []},
    )
    claim, spec = parse_claim(raw, "toy")
    assert spec.space["moco.momentum, data.augment"].grid == [[0.9, ops], [0.99, ops]]
    assert claim.grid() == [
        {"moco.momentum": 0.9, "data.augment": "crop"},
        {"moco.momentum": 0.99, "data.augment": "crop"},
    ]
    assert claim.resolve({"data.augment": "crop"}) == {"data.augment": ops}
    assert same_value(ops, str(ops)) and not same_value(ops, str(ops[:0]))  # an MLflow param holds str(list)


def test_evidence_pairs_by_seed_and_decides():
    claim, _ = parse_claim(raw_claim(), "toy")
    runs = runs_frame(KNN, LOSS)
    verdict, results = evaluate_claim(claim, runs, BASELINES)
    by_name = {r.check.name: r for r in results}
    assert by_name["0.99 beats 0.9"].verdict == REPRODUCED
    assert list(by_name["0.99 beats 0.9"].a.index) == [0, 1, 2]
    assert by_name["m=0 at most random init"].verdict == REPRODUCED  # 40 vs 46: far below
    near = by_name["m=0 loss near chance"]
    assert near.a.iloc[0] == pytest.approx(6.9 / math.log(1025)) and near.verdict == REPRODUCED
    assert verdict == REPRODUCED


def test_a_reversed_effect_is_not_reproduced_and_the_claim_follows():
    claim, _ = parse_claim(raw_claim(), "toy")
    knn = dict(KNN)
    knn.update({(0.99, s): v for s, v in enumerate([40.0, 42.0, 41.0])})  # 0.99 now far below 0.9
    verdict, results = evaluate_claim(claim, runs_frame(knn, LOSS), BASELINES)
    assert results[0].verdict == NOT_REPRODUCED and verdict == NOT_REPRODUCED


def test_unfinished_runs_drop_their_seed_from_the_pairs():
    claim, _ = parse_claim(raw_claim(), "toy")
    runs = runs_frame(KNN, LOSS, status={(0.99, 2): "FAILED", (0.99, 1): "FAILED"})
    _, results = evaluate_claim(claim, runs, BASELINES)
    assert results[0].interval.n == 1 and results[0].verdict == INCONCLUSIVE
    assert list(by_seed(runs, {"moco.momentum": 0.99}, "knn_top1").index) == [0]


def test_rows_table_and_report(tmp_path):
    claim, _ = parse_claim(raw_claim(), "toy")
    runs = runs_frame(KNN, LOSS)
    table = rows_table(claim, runs)
    assert list(table["setting"]) == ["moco.momentum=0.0", "moco.momentum=0.9", "moco.momentum=0.99"]
    assert table.loc[1, "paper"] == 55.2 and table.loc[2, "knn_top1_mean"] == pytest.approx(70.333, abs=1e-3)
    labels = settings_of_runs(runs, claim)
    curves = pd.DataFrame(
        [
            {"run_id": rid, "step": e, "value": 7 - e, "setting": labels[rid], "seed": rid[-1]}
            for rid in labels.index
            for e in range(1, 4)
        ]
    )
    verdict, results = evaluate_claim(claim, runs, BASELINES)
    report = ClaimReport(claim, "rep-toy", table, BASELINES, results, verdict, curves)
    path = write_report([report], tmp_path, "# Header")
    text = path.read_text()
    assert (tmp_path / "toy.png").stat().st_size > 1000
    assert "## Toy momentum (`toy`): reproduced" in text and "55.2" in text and "70.3 ± 1.5" in text
    assert "0.99 beats 0.9" in text and "[90% CI]" in text and "![toy](toy.png)" in text
    assert "| random init (same seeds) | - | 46.0 ± 1.0 |" in text and "Verdict metric: kNN top-1" in text
    assert "linear probe" not in text  # no run logged the probe: no empty column


def test_the_linear_probe_is_a_verdict_metric_against_its_own_random_init_level(tmp_path):
    raw = raw_claim(
        metric="lincls_fast_top1",
        checks=[
            {"name": "0.99 beats 0.9", "a": {"moco.momentum": 0.99}, "relation": ">", "b": {"moco.momentum": 0.9}},
            {"name": "0.9 beats random init", "a": {"moco.momentum": 0.9}, "relation": ">", "b": "random_init"},
        ],
    )
    claim, _ = parse_claim(raw, "toy")
    runs = runs_frame(KNN, LOSS)
    runs["metrics.lincls_fast_top1"] = runs["metrics.knn_top1"] + 10  # the probe 10 points above kNN
    baselines = BASELINES.assign(lincls_fast_top1=[59.0, 61.0, 60.0])  # probe's random init: 60 > 0.9's kNN + 10?
    verdict, results = evaluate_claim(claim, runs, baselines)
    assert [r.metric for r in results] == ["lincls_fast_top1"] * 2
    assert results[0].verdict == REPRODUCED
    assert results[1].verdict == INCONCLUSIVE  # 0.9: 60, 63, 58 against 59, 61, 60 (knn baseline would say >)
    table = rows_table(claim, runs)
    report = ClaimReport(claim, "rep-toy", table, baselines, results, verdict, pd.DataFrame(columns=["setting"]))
    text = write_report([report], tmp_path, "# Header").read_text()
    assert "linear probe top-1 (verdict)" in text and "| 60.0 ± 1.0 |" in text
    assert "ours: linear probe top-1" in text and "Verdict metric: linear probe top-1" in text


def test_figure_labels_drop_the_key_prefixes_not_the_values():
    """The report's first figures read "9", "99", "07" for momenta and temperatures: values keep their dots."""
    assert _short("moco.momentum=0.99") == "momentum=0.99"
    labels = _short("moco.mlp=True, moco.temperature=0.07, train.schedule=step")
    assert labels == "mlp=True, temperature=0.07, schedule=step"


def test_a_diagnostic_check_is_decided_and_shown_but_does_not_decide_the_claim(tmp_path):
    diagnostic = {"name": "why", "a": {"moco.momentum": 0.9}, "relation": ">", "b": "random_init", "role": "diagnostic"}
    beats = {"name": "0.99 beats 0.9", "a": {"moco.momentum": 0.99}, "relation": ">", "b": {"moco.momentum": 0.9}}
    claim, _ = parse_claim(raw_claim(checks=[beats, diagnostic]), "toy")
    verdict, results = evaluate_claim(claim, runs_frame(KNN, LOSS), BASELINES)
    assert [r.verdict for r in results] == [REPRODUCED, INCONCLUSIVE] and verdict == REPRODUCED
    assert results[0].seeds_needed == 2  # 0.99 leads 0.9 by ~20 points with a spread of ~1.5
    table = rows_table(claim, runs_frame(KNN, LOSS))
    report = ClaimReport(claim, "rep-toy", table, BASELINES, results, verdict, pd.DataFrame(columns=["setting"]))
    text = write_report([report], tmp_path, "# Header").read_text()
    assert "inconclusive (diagnostic)" in text and "seeds for 80% power" in text
    with pytest.raises(ConfigError, match="at least one check must have role: claim"):
        parse_claim(raw_claim(checks=[diagnostic]), "toy")


def test_curve_metrics_are_the_largest_loss_spike_and_knn_dip_of_each_run():
    from mocolab.reproduce.evidence import with_curves

    runs = pd.DataFrame({"run_id": ["a", "b", "c"]})
    loss = pd.DataFrame(
        {"run_id": ["a"] * 4 + ["b"] * 3, "step": [1, 2, 3, 4, 3, 1, 2], "value": [5.0, 4.0, 4.6, 4.1, 3.0, 4.0, 3.5]}
    )
    knn = pd.DataFrame({"run_id": ["a"] * 3, "step": [4, 8, 12], "value": [30.0, 25.0, 40.0]})
    out = with_curves(runs, {"loss": loss, "knn_top1": knn})
    assert out["metrics.loss_max_rise"].tolist()[:2] == pytest.approx([0.6, -0.5])  # b: 4.0 -> 3.5 -> 3.0
    assert out["metrics.knn_max_drop"].tolist()[0] == pytest.approx(5.0)
    assert out[["metrics.loss_max_rise", "metrics.knn_max_drop"]].iloc[2].isna().all()


DETECTION_CLAIMS = ("detection_digits", "detection_raccoon")


@pytest.mark.parametrize("name", DETECTION_CLAIMS)
def test_detection_claims_check_every_AP_against_random_init_and_every_run_finishing(name):
    claim, spec, _ = load_claim(name)
    assert claim.metric == "det_AP" and claim.all_runs_finish and len(spec.seeds) >= 3
    checks = {(claim.metric_of(c), c.relation, c.b) for c in claim.checks}
    assert checks == {(m, ">", "random_init") for m in ("det_AP", "det_AP50", "det_AP75")}
    assert "supervised" in claim.departures and "PILOT" not in claim.chosen


@pytest.mark.parametrize("name", DETECTION_CLAIMS)
def test_a_detection_claim_seeds_each_trial_and_its_random_init_run_alike(name):
    from mocolab.reproduce.claims import grid_settings
    from mocolab.tune.spec import SEED_KEY, prepare_sweep, trial_config

    claim, spec, path = load_claim(name)
    spec = spec.model_copy(update={"name": f"rep-{name}"})
    base, trials = prepare_sweep(spec, path.parent, [])
    assert [(t.train.seed, t.eval.detection.seed) for t in trials] == [(s, s) for s in spec.seeds]
    setting = grid_settings(spec)[0]  # how run.random_init_baselines builds the config of a seed
    init = trial_config(spec, base, {**setting, SEED_KEY: spec.seeds[-1]}, run_name=f"rep-{name}-init")
    assert init.eval.detection == trials[-1].eval.detection
