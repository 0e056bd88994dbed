"""The pretraining driver without training: trainer settings from the config, refusal of finished runs."""

from pathlib import Path

import yaml

from mocolab import cli, tracking
from mocolab.config import build_config
from mocolab.train.launch import build_trainer
from mocolab.train.pretrain import train_loop


def config(tmp_path: Path, **scaling):
    raw = {
        "model": {"arch": "small_cnn", "bn": "shuffle"},
        "moco": {"queue_size": 1024},
        "data": {"dataset": "digits", "image_size": 16, "digits": {"canvas": 16, "max_scale": 2.0}},
        "train": {"batch_size": 32, "max_failures": 3, "keep_checkpoints": 4},
        "scaling": {"num_workers": 2, "storage_path": "runs", **scaling},
        "tracking": {"run_name": "launch-test", "tracking_uri": "sqlite:///mlflow.db"},
    }
    return build_config(raw, base=tmp_path)


def test_trainer_maps_scaling_failure_and_checkpoint_settings(tmp_path):
    cfg = config(tmp_path, cpus_per_worker=2)
    trainer = build_trainer(cfg, "run123")
    run = trainer.run_config
    assert (run.name, run.storage_path) == ("launch-test", str(tmp_path / "runs"))
    assert run.failure_config.max_failures == 3
    assert run.checkpoint_config.num_to_keep == 4
    assert trainer.scaling_config.num_workers == 2 and not trainer.scaling_config.use_gpu
    assert trainer.scaling_config.resources_per_worker == {"CPU": 2}
    pinned = build_trainer(config(tmp_path, resources_per_worker={"spot_a100": 1}), "run123")
    assert pinned.scaling_config.resources_per_worker == {"CPU": 1, "spot_a100": 1}
    assert trainer.train_loop_per_worker is train_loop
    assert trainer.train_loop_config["mlflow_run_id"] == "run123"
    assert trainer.train_loop_config["config"]["moco"]["queue_size"] == 1024


def test_pretrain_refuses_a_finished_run_name_before_starting_ray(tmp_path, mlflow_uri, capsys):
    cfg = config(tmp_path)
    run_id, _ = tracking.start_pretrain_run(cfg)
    tracking.end_run(cfg.tracking.tracking_uri, run_id)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))

    assert cli.main(["pretrain", str(path)]) == 2
    err = capsys.readouterr().err
    assert "launch-test" in err and "already finished" in err and "--set tracking.run_name=" in err
    assert not (tmp_path / "runs" / "launch-test").exists()
