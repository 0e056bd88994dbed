"""A sweep's quiet console: each trial's start and end line says its setting and headline metrics."""

from __future__ import annotations

from mocolab.tune.progress import metrics_text, setting_text, trial_line


def test_the_setting_unzips_zipped_axes_and_puts_the_seed_last():
    params = {"train.seed": 2, "moco.mechanism, train.batch_size": ("memory_bank", 64), "moco.momentum": 0.9}
    assert setting_text(params) == "moco.mechanism=memory_bank train.batch_size=64 moco.momentum=0.9 seed=2"
    assert setting_text({}) == "base config"


def test_the_end_line_shows_the_headline_metrics_present_and_nothing_of_the_rest():
    result = {"knn_top1": 71.25, "det_AP": 30.5, "loss": 2.5, "system/cpu_utilization_percentage": 80.0}
    assert metrics_text(result) == "knn_top1 71.25  det_AP 30.50"
    line = trial_line("tiny-00001", {"moco.momentum": 0.9, "train.seed": 0}, "done", result)
    assert line == "[mocolab] trial tiny-00001 (moco.momentum=0.9 seed=0) done: knn_top1 71.25  det_AP 30.50"
    assert trial_line("tiny-00001", {"moco.momentum": 0.9}, "started") == (
        "[mocolab] trial tiny-00001 (moco.momentum=0.9) started"
    )
