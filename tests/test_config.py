"""Config validation: one test per rule, each checking that the message names the field and the fix."""

import pytest

from mocolab.config import ConfigError, build_config, load_config, parse_override


def refused(raw: dict, *fragments: str) -> str:
    with pytest.raises(ConfigError) as err:
        build_config(raw)
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_defaults_are_valid_and_get_a_run_name():
    cfg = build_config({})
    assert cfg.tracking.run_name.startswith("moco-")
    assert build_config({}).tracking.run_name != cfg.tracking.run_name
    assert cfg.moco.version == "v2" and cfg.moco.mlp is True


@pytest.mark.parametrize(
    "version, mlp, t, augment, schedule",
    [("v1", False, 0.07, "moco_v1", "step"), ("v2", True, 0.2, "moco_v2", "cosine")],
)
def test_version_is_a_preset(version, mlp, t, augment, schedule):
    cfg = build_config({"moco": {"version": version}, "train": {"epochs": 200}})
    assert (cfg.moco.mlp, cfg.moco.temperature, cfg.data.augment, cfg.train.schedule) == (mlp, t, augment, schedule)
    assert cfg.train.lr_milestones == ([120, 160] if schedule == "step" else [])
    params = cfg.flat()  # what MLflow shows: the resolved values
    assert (params["moco.mlp"], params["moco.temperature"], params["data.augment"]) == (mlp, t, augment)


def test_explicit_keys_override_the_preset_and_milestones_scale_with_the_epochs():
    cfg = build_config({"moco": {"version": "v1", "temperature": 0.2, "mlp": True}, "train": {"epochs": 12}})
    assert (cfg.moco.mlp, cfg.moco.temperature, cfg.data.augment, cfg.train.schedule) == (True, 0.2, "moco_v1", "step")
    assert cfg.train.lr_milestones == [7, 10]  # 60 % and 80 % of 12 epochs, the paper's 120/160 of 200
    pinned = build_config({"moco": {"version": "v1"}, "train": {"epochs": 12, "lr_milestones": [3, 9]}})
    assert pinned.train.lr_milestones == [3, 9]
    again = build_config(cfg.model_dump(mode="json"))  # a resolved config reloads unchanged (Ray workers)
    assert again.model_dump() == cfg.model_dump()


def test_version_override_on_a_v2_file_switches_every_preset_key(tmp_path):
    path = tmp_path / "v2.yaml"
    path.write_text("moco: {version: v2, queue_size: 4096}\ntrain: {epochs: 20}\n")
    cfg = load_config(path, ["moco.version=v1"])
    assert (cfg.moco.mlp, cfg.moco.temperature, cfg.data.augment, cfg.train.schedule) == (
        False,
        0.07,
        "moco_v1",
        "step",
    )


def test_unknown_key_is_named():
    refused({"moco": {"temprature": 0.2}}, "moco.temprature", "unknown key")
    refused({"optimizer": {}}, "optimizer", "unknown key")


@pytest.mark.parametrize("t", [0, -0.1])
def test_temperature_must_be_positive(t):
    refused({"moco": {"temperature": t}}, "moco.temperature", "> 0")


@pytest.mark.parametrize("m", [-0.1, 1.5])
def test_momentum_in_unit_interval(m):
    refused({"moco": {"momentum": m}}, "moco.momentum", "[0, 1]")


def test_queue_size_multiple_of_global_batch():
    msg = refused(
        {"moco": {"queue_size": 1000}, "train": {"batch_size": 64}, "scaling": {"num_workers": 2}},
        "moco.queue_size=1000",
        "global batch 128",
    )
    assert "use e.g. 896" in msg
    build_config({"moco": {"queue_size": 1024}, "train": {"batch_size": 64}, "scaling": {"num_workers": 2}})


def test_config_rules_are_pure(monkeypatch):
    """No file, dataset or albumentations at load: those checks are the pre-flight step's."""
    import builtins

    real_import = builtins.__import__

    def guarded(name, *args, **kwargs):
        assert not name.startswith(("albumentations", "mocolab.data", "sklearn")), f"config load imported {name}"
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", guarded)
    cfg = build_config({"data": {"dataset": "cifar10", "root": "/no/such/dir", "augment": [{"op": "NoSuchOp"}]}})
    assert str(cfg.data.root) == "/no/such/dir"


def test_queue_multiple_rule_is_only_for_the_queue_mechanism():
    build_config({"moco": {"mechanism": "end_to_end", "queue_size": 1000}, "train": {"batch_size": 64}})


def test_the_linear_probe_needs_the_monitor_and_the_momentum_warm_up_fits_the_run():
    refused({"train": {"linear_probe": True, "knn_every": 0}}, "train.linear_probe", "train.knn_every > 0")
    refused(
        {"data": {"dataset": "folder", "root": "."}, "train": {"linear_probe": True}},
        "train.linear_probe",
        "train.knn_dataset",
    )
    refused({"moco": {"momentum_warmup_epochs": 5}, "train": {"epochs": 5}}, "moco.momentum_warmup_epochs=5")
    build_config({"moco": {"momentum_warmup_epochs": 2}, "train": {"epochs": 5, "linear_probe": True}})


def test_missing_data_root():
    refused({"data": {"dataset": "imagefolder"}}, "data.root is required")


def test_shuffle_bn_needs_two_workers():
    refused({"model": {"bn": "shuffle"}, "scaling": {"num_workers": 1}}, "model.bn=shuffle", "model.bn=split")


def test_bn_splits_divide_batch():
    refused(
        {"model": {"bn": "split", "bn_splits": 3}, "train": {"batch_size": 64}, "moco": {"queue_size": 4096}},
        "model.bn_splits=3",
        "train.batch_size=64",
    )


def test_sync_bn_runs_on_cpu_and_gpu():
    """model.bn=sync is the all-reduce BN on CPU (gloo) and SyncBatchNorm on GPU: both configs load."""
    assert build_config({"model": {"bn": "sync"}}).model.bn == "sync"
    assert build_config({"model": {"bn": "sync"}, "scaling": {"use_gpu": True}}).model.bn == "sync"


@pytest.mark.parametrize(
    "arch, optimizer, temperature, lr",
    [
        ("timm:vit_tiny_patch16_224", "adamw", 0.2, 1.5e-4),
        ("resnet18", "lars", 1.0, 0.6),
        ("timm:resnet18", "lars", 1.0, 0.6),
    ],
)
def test_v3_preset_by_backbone(arch, optimizer, temperature, lr):
    cfg = build_config({"moco": {"version": "v3"}, "model": {"arch": arch}, "data": {"image_size": 32}})
    assert (cfg.moco.mechanism, cfg.moco.symmetric, cfg.moco.momentum_schedule, cfg.model.bn) == (
        "moco_v3",
        True,
        "cosine",
        "sync",
    )
    assert (cfg.train.optimizer, cfg.moco.temperature, cfg.train.lr) == (optimizer, temperature, lr)
    assert cfg.base_lr == lr * cfg.global_batch / 256
    assert cfg.flat()["train.optimizer"] == optimizer  # MLflow params show the resolved values


def test_v3_preset_explicit_keys_win():
    cfg = build_config(
        {
            "moco": {"version": "v3", "temperature": 0.5},
            "train": {"optimizer": "sgd", "lr_per_256": False},
            "model": {"arch": "timm:vit_tiny_patch16_224", "vit_freeze_patch_proj": False},
            "data": {"image_size": 32},
        }
    )
    assert (cfg.moco.temperature, cfg.train.optimizer, cfg.base_lr, cfg.model.vit_freeze_patch_proj) == (
        0.5,
        "sgd",
        cfg.train.lr,
        False,
    )
    assert cfg.model.vit_sincos_pos


def test_moco_v3_needs_both_crops_as_queries():
    refused({"moco": {"version": "v3", "symmetric": False}}, "moco.mechanism=moco_v3", "moco.symmetric=true")


def test_timm_arch_rules():
    refused({"model": {"arch": "timm:"}}, "model.arch")
    refused({"model": {"arch": "vgg"}}, "model.arch='vgg'", "timm:<timm model name>")
    refused({"model": {"arch": "timm:no_such_net"}}, "model.arch=timm:no_such_net", "timm.list_models")
    refused(
        {"model": {"arch": "timm:vit_tiny_patch16_224"}, "data": {"image_size": 40}},
        "data.image_size=40",
        "patch size 16",
        "data.image_size=32",
    )
    vit = "timm:vit_tiny_patch16_224"
    refused(
        {"model": {"arch": vit, "timm_kwargs": {"patch_size": 6}}, "data": {"image_size": 32}},
        "patch size 6",
        "data.image_size=30",
    )
    refused({"model": {"arch": "timm:resnet18", "cifar_stem": True}}, "model.cifar_stem")
    refused({"model": {"arch": "resnet18", "timm_kwargs": {"depth": 2}}}, "model.timm_kwargs")
    build_config({"model": {"arch": vit, "timm_kwargs": {"patch_size": 8}}, "data": {"image_size": 32}})


@pytest.mark.parametrize(
    "value, amp", [("bf16", "bf16"), ("fp16", "fp16"), ("off", "off"), (False, "off"), (True, "bf16")]
)
def test_amp_names_the_precision_on_any_device(value, amp):
    cfg = build_config({"train": {"amp": value}})  # CPU: autocast and the fp16 GradScaler run there too
    assert cfg.train.amp == amp
    assert build_config(cfg.model_dump(mode="json")).train.amp == amp  # a resolved config reloads unchanged


def test_amp_yaml_off_and_unknown_precisions(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  amp: off\n")  # YAML 1.1 reads off as false
    assert load_config(path).train.amp == "off"
    assert load_config(path, ["train.amp=fp16"]).train.amp == "fp16"
    refused({"train": {"amp": "fp8"}}, "train.amp", "bf16", "fp16", "off")


def test_finiteness_check_interval_and_price_must_be_positive():
    refused({"train": {"check_finite_every": 0}}, "train.check_finite_every")
    refused({"tracking": {"price_per_device_hour": -1}}, "tracking.price_per_device_hour")
    assert build_config({"tracking": {"price_per_device_hour": 2.5}}).tracking.price_per_device_hour == 2.5


def test_cifar_stem_only_for_resnets():
    refused({"model": {"arch": "small_cnn", "cifar_stem": True}}, "model.cifar_stem")


def test_literal_values_listed():
    refused({"model": {"arch": "vgg16"}}, "model.arch", "resnet18")
    refused({"model": {"bn": "group"}}, "model.bn", "shuffle")


def test_step_milestones_increasing():
    refused({"train": {"schedule": "step", "lr_milestones": [160, 120]}}, "train.lr_milestones")


def test_lincls_milestones_are_fractions():
    refused({"eval": {"lincls": {"milestones": [60, 80]}}}, "eval.lincls.milestones")


def test_bank_momentum_range():
    refused({"moco": {"bank_momentum": 1.0}}, "moco.bank_momentum")


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("moco:\n  temperature: 0.07\n")
    cfg = load_config(path, ["moco.temperature=0.2", "train.lr_milestones=[10, 20]", "moco.mlp=false"])
    assert cfg.moco.temperature == 0.2 and cfg.train.lr_milestones == [10, 20] and cfg.moco.mlp is False
    with pytest.raises(ConfigError, match="moco.temperature"):
        load_config(path, ["moco.temperature=-1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("moco.temperature")


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_paths_and_sqlite_uri_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "test").mkdir()
    cfg = build_config({"data": {"dataset": "imagefolder", "root": "data"}, "scaling": {"storage_path": "runs"}})
    assert cfg.data.root == str(tmp_path / "data")
    assert cfg.scaling.storage_path == str(tmp_path / "runs")
    assert cfg.tracking.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    s3 = build_config({"scaling": {"storage_path": "s3://bucket/runs"}})
    assert s3.scaling.storage_path == "s3://bucket/runs"


@pytest.mark.parametrize("uri", ["s3://bucket/data/cifar", "gs://bucket/imagenet/", "s3://bucket"])
def test_object_store_roots_stay_as_given(uri, tmp_path, monkeypatch):
    """A URI is kept byte for byte (a Path would make s3://b/x s3:/b/x); a path still becomes absolute."""
    monkeypatch.chdir(tmp_path)
    section = {"dataset": "imagefolder", "root": uri}
    cfg = build_config(
        {
            "data": {**section, "reader": "stream"},
            "train": {"knn_dataset": section},
            "eval": {"lincls": {"dataset": section}},
        }
    )
    assert cfg.data.root == cfg.train.knn_dataset.root == cfg.eval.lincls.dataset.root == uri
    assert cfg.data.reader == "stream" and cfg.flat()["data.root"] == uri
    assert build_config(cfg.model_dump()).data.root == uri  # a resolved config reloads unchanged
    assert build_config({"data": {"dataset": "folder", "root": "imgs"}}).data.root == str(tmp_path / "imgs")


def test_config_command_prints_the_uri_unchanged(capsys):
    import argparse

    from mocolab.commands import config as config_command

    config_command.main(argparse.Namespace(config=None, overrides=["data.dataset=folder", "data.root=s3://b/x/y"]))
    assert "root: s3://b/x/y\n" in capsys.readouterr().out


def test_uri_roots_that_name_no_bucket_or_detection_uris_are_refused():
    refused(
        {"data": {"dataset": "folder", "root": "s3://"}}, "data.root: s3:// names no bucket; use s3://BUCKET/prefix"
    )
    refused({"train": {"knn_dataset": {"dataset": "imagefolder", "root": "gs:///"}}}, "train.knn_dataset.root: gs:///")
    refused({"data": {"reader": "pipe"}}, "data.reader", "'loader'", "'stream'")
    refused(
        {"eval": {"detection": {"data": {"root": "s3://b/voc"}}}},
        "eval.detection.data.root: s3://b/voc: detection reads a local or NFS folder",
    )


def test_tracking_uri_from_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert build_config({}).tracking.tracking_uri == "http://127.0.0.1:5999"


def test_flat_params_use_dotted_keys():
    flat = build_config({}).flat()
    for key in (
        "moco.version",
        "moco.dim",
        "moco.queue_size",
        "moco.momentum",
        "moco.temperature",
        "moco.mlp",
        "model.arch",
        "model.cifar_stem",
        "model.bn",
        "model.bn_splits",
        "data.dataset",
        "data.root",
        "data.augment",
        "data.image_size",
        "train.epochs",
        "train.batch_size",
        "train.lr",
        "train.schedule",
        "train.weight_decay",
        "train.seed",
        "train.amp",
        "scaling.num_workers",
        "scaling.use_gpu",
        "tracking.experiment",
        "tracking.run_name",
    ):
        assert key in flat, key


def test_custom_worker_resources():
    cfg = build_config({"scaling": {"resources_per_worker": {"spot_a100": 1}}})
    assert cfg.scaling.resources_per_worker == {"spot_a100": 1.0}
    assert cfg.flat()["scaling.resources_per_worker.spot_a100"] == 1.0  # an MLflow param and a sweep axis
    refused(
        {"scaling": {"resources_per_worker": {"CPU": 2}}}, "scaling.resources_per_worker", "scaling.cpus_per_worker"
    )
    refused({"scaling": {"resources_per_worker": {"gpu": 1}}}, "scaling.resources_per_worker", "scaling.use_gpu")
    refused({"scaling": {"resources_per_worker": {"slot": 0}}}, "scaling.resources_per_worker", "> 0")


def test_data_pipeline_defaults_to_cpu_and_device_takes_named_recipes_only():
    assert build_config({}).data.pipeline == "cpu"
    for recipe in ("moco_v1", "moco_v2", "none"):
        assert build_config({"data": {"pipeline": "device", "augment": recipe}}).data.pipeline == "device"
    refused({"data": {"pipeline": "gpu"}}, "data.pipeline", "'cpu'", "'device'")
    refused(
        {"data": {"pipeline": "device", "augment": [{"op": "HorizontalFlip"}]}},
        "data.pipeline=device runs the named recipes moco_v1, moco_v2, none only",
        "or data.pipeline=cpu for a custom list of albumentations ops",
    )


def test_evaluation_seeds_follow_the_run_seed_unless_set():
    raw = {"train": {"seed": 3}, "eval": {"lincls": {}, "detection": {"data": {"made_digits": True}}}}
    cfg = build_config(raw)
    assert (cfg.eval.lincls.seed, cfg.eval.detection.seed) == (3, 3)
    assert cfg.flat()["eval.detection.seed"] == 3  # params show the seed used
    raw["eval"]["detection"]["seed"] = 7
    assert build_config(raw).eval.detection.seed == 7


def test_the_quickstart_and_the_probe_seed_their_evaluations_with_the_run():
    from mocolab.evaluate.pipeline import with_lincls
    from mocolab.evaluate.probe import probe_protocol
    from mocolab.quickstart import quickstart_config

    cfg = quickstart_config(seed=2)
    assert (cfg.eval.lincls.seed, cfg.eval.detection.seed) == (2, 2)
    bare = build_config({"train": {"seed": 5}})
    assert with_lincls(bare, "small_cnn").eval.lincls.seed == 5
    assert probe_protocol("small_cnn", 4).seed == 4
