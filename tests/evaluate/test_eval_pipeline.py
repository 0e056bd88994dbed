"""The evaluation pipeline's pure parts: the quickstart's evaluation settings and the headline metrics."""

from __future__ import annotations

from mocolab.config import build_config
from mocolab.evaluate.detection import check_detection
from mocolab.evaluate.pipeline import headline_metrics
from mocolab.quickstart import QUICKSTART_EVALS, quickstart_config


def test_quickstart_evals_fit_the_quickstart_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert QUICKSTART_EVALS.resolve().name == "quickstart.yaml" and QUICKSTART_EVALS.resolve().parent.name == "eval"
    cfg = quickstart_config()  # the quickstart's pretraining config names no evaluations: it gets these
    assert cfg.eval.lincls.fast and cfg.eval.lincls.lr == 30.0
    det = cfg.eval.detection
    assert det.data.made_digits and not det.fpn
    check_detection(cfg, cfg.model, det)  # small_cnn: single-level detector, CPU BN mode


def test_headline_metrics_keep_only_downstream_names():
    results = {
        "lincls": {"lincls_fast_top1": 50.0, "lincls_fast_top5": 90.0, "lincls_time_s": 3.0, "run_id": "a"},
        "detection": {"det_AP": 10.0, "det_AP50": 30.0, "det_AP75": 5.0, "det_train_s": 9.0, "run_id": "b"},
    }
    assert headline_metrics(results) == {
        "lincls_fast_top1": 50.0,
        "lincls_fast_top5": 90.0,
        "det_AP": 10.0,
        "det_AP50": 30.0,
        "det_AP75": 5.0,
    }


def test_eval_only_config_file_is_a_valid_config():
    from mocolab.config import read_yaml

    build_config(read_yaml(QUICKSTART_EVALS))
