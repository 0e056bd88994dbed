"""The whole quickstart on a local Ray: MoCo's kNN accuracy beats the random-init encoder's by 5 points."""

import pytest
from mlflow import MlflowClient

from mocolab import tracking
from mocolab.quickstart import quickstart_config, run_quickstart


@pytest.mark.slow
def test_quickstart_beats_random_init_by_five_points(ray_local, mlflow_uri, tmp_path):
    cfg = quickstart_config(seed=0, overrides=[f"scaling.storage_path={tmp_path / 'ray_results'}"])
    run_id, rows = run_quickstart(cfg)

    (name, random_init, moco), *_ = rows
    assert name.startswith("kNN")
    assert moco >= random_init + 5, rows
    run = MlflowClient(mlflow_uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[tracking.STAGE_TAG] == "pretrain"
    assert run.data.params["model.bn"] == "shuffle" and run.data.params["scaling.num_workers"] == "2"
