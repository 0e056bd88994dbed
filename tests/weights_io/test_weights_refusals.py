"""Bad weights files are refused before compute and before an MLflow run exists, with one message naming the
option or field, the file and the fix: a text file, a pickle that would run code, an unknown layout, weights of
another architecture (lincls, detect, pretraining's model.init_weights), an export detectron2 cannot take."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from mlflow import MlflowClient

from mocolab import cli, tracking
from mocolab.config import ConfigError, ModelConfig, build_config
from mocolab.moco.backbones import backbone_state_dict, build_backbone
from mocolab.weights_io.arch import ArchGuess, guess_arch
from mocolab.weights_io.files import load_backbone_weights, read_weights_file
from mocolab.weights_io.layouts import LAYOUTS

REPO = Path(__file__).resolve().parents[2]
EVAL_QUICKSTART = str(REPO / "experiments" / "eval" / "quickstart.yaml")
PRETRAIN_QUICKSTART = str(REPO / "experiments" / "pretrain" / "quickstart.yaml")


class RunsCodeWhenUnpickled:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _small_cnn_backbone(path: Path) -> Path:
    backbone, _ = build_backbone(ModelConfig(arch="small_cnn", bn="plain"))
    torch.save(backbone_state_dict(backbone), path)
    return path


def _no_runs(uri: str) -> bool:
    client = MlflowClient(uri)
    return not any(client.search_runs([e.experiment_id]) for e in client.search_experiments())


def test_text_file_is_not_a_pytorch_checkpoint(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("these are not weights\n")
    with pytest.raises(ConfigError, match=rf"--weights {text} is not a PyTorch checkpoint"):
        read_weights_file(text, f"--weights {text}")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="is not a PyTorch checkpoint"):
        read_weights_file(tmp_path / "empty.pt", "--weights empty.pt")


def test_truncated_checkpoint_is_not_readable(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(torchvision.models.resnet18().state_dict(), good)
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ConfigError, match="cut.pt is not a readable PyTorch checkpoint.*is it complete"):
        read_weights_file(tmp_path / "cut.pt", "--weights cut.pt")


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_that_would_run_code_is_refused_and_never_run(writer, tmp_path):
    marker, path = tmp_path / "code-ran", tmp_path / "weights.pt"
    payload = {"x": RunsCodeWhenUnpickled(marker), "state_dict": {"conv1.weight": torch.zeros(1)}}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(ConfigError) as err:
        read_weights_file(path, f"--weights {path}")
    message = str(err.value)
    assert f"--weights {path} is not a weights-only checkpoint" in message
    assert "system" in message and "will not load it unsafely" in message
    assert "weights_only=False" not in message and "Weights only load failed" not in message  # not torch's advice
    assert not marker.exists()


def test_plain_pickle_of_an_object_is_not_weights_only(tmp_path):
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps({"model": ModelConfig()}))  # any class instance, harmless or not
    with pytest.raises(ConfigError, match="not a weights-only checkpoint: it holds the Python object mocolab.config"):
        read_weights_file(path, "--weights model.pkl")


def test_unknown_layout_lists_the_known_ones_and_the_keys_seen(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"weights": {"stage0.conv.w": torch.zeros(1)}, "step": 3}, path)
    with pytest.raises(ConfigError) as err:
        load_backbone_weights(path, f"--weights {path}")
    message = str(err.value)
    assert f"--weights {path}: unknown weights layout" in message
    assert "top-level keys are ['weights', 'step']" in message and "'stage0.conv.w'" in message
    assert all(layout.name in message for layout in LAYOUTS)
    assert "model.arch" not in message  # not an architecture problem


def test_guess_arch_reads_depth_block_and_stem():
    def state(net):
        return {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}

    assert guess_arch(state(torchvision.models.resnet18())) == ArchGuess("resnet18")
    assert guess_arch(state(torchvision.models.resnet34())) == ArchGuess("resnet34")
    assert guess_arch(state(torchvision.models.resnet50())) == ArchGuess("resnet50")
    assert guess_arch(state(torchvision.models.resnet101())).arch == "resnet101"
    assert guess_arch(state(torchvision.models.wide_resnet50_2())).arch == "wide_resnet50_2"
    cifar, _ = build_backbone(ModelConfig(arch="resnet18", cifar_stem=True, bn="plain"))
    assert guess_arch(backbone_state_dict(cifar)) == ArchGuess("resnet18", cifar_stem=True)
    small, _ = build_backbone(ModelConfig(arch="small_cnn", bn="plain"))
    assert guess_arch(backbone_state_dict(small)) == ArchGuess("small_cnn")
    assert guess_arch({"encoder.weight": torch.zeros(1)}) is None


@pytest.mark.parametrize(
    "weights_model,config_model,expected",
    [
        ({"arch": "resnet50"}, {"arch": "resnet18"}, "--set model.arch=resnet50 --set model.cifar_stem=false"),
        ({"arch": "resnet18", "cifar_stem": True}, {"arch": "resnet18"}, "--set model.cifar_stem=true"),
        ({"arch": "small_cnn"}, {"arch": "resnet34"}, "--set model.arch=small_cnn"),
    ],
)
def test_weights_of_another_arch_name_it(weights_model, config_model, expected, tmp_path):
    from mocolab.evaluate.weights import check_source, resolve_source

    backbone, _ = build_backbone(ModelConfig(bn="plain", **weights_model))
    torch.save(backbone_state_dict(backbone), tmp_path / "backbone.pt")
    cfg = build_config({"model": {"bn": "plain", **config_model}, "scaling": {"num_workers": 1}})
    with pytest.raises(ConfigError, match=f"does not fit model.arch={config_model['arch']}.*{expected}"):
        check_source(resolve_source(cfg, weights=str(tmp_path / "backbone.pt")))


def test_lincls_with_a_text_file_is_one_message_and_no_run(tmp_path, mlflow_uri, command_output):
    text = tmp_path / "weights.txt"
    text.write_text("not weights")
    assert cli.main(["lincls", EVAL_QUICKSTART, "--weights", str(text)]) == 2
    err = command_output().err
    assert f"mocolab lincls: --weights {text} is not a PyTorch checkpoint" in err and "Traceback" not in err
    assert _no_runs(mlflow_uri)


def test_detect_with_weights_of_another_arch_is_refused_in_the_driver(tmp_path, mlflow_uri, command_output):
    weights = _small_cnn_backbone(tmp_path / "backbone.pt")
    code = cli.main(["detect", EVAL_QUICKSTART, "--weights", str(weights), "--set", "model.arch=resnet18",
                     "--set", f"scaling.storage_path={tmp_path / 'ray_results'}"])  # fmt: skip
    assert code == 2
    err = command_output().err
    assert f"mocolab detect: --weights {weights} (torchvision layout) does not fit model.arch=resnet18" in err
    assert "--set model.arch=small_cnn" in err and "Traceback" not in err
    assert _no_runs(mlflow_uri)  # refused before any MLflow run (and before Ray)
    assert not (tmp_path / "ray_results").exists()


def test_init_weights_path_is_made_absolute_at_load(tmp_path):
    cfg = build_config({"model": {"init_weights": "b.pt"}}, base=tmp_path)  # pure: the file is the pre-flight's
    assert cfg.model.init_weights == tmp_path / "b.pt"  # relative to where the config is loaded
    assert cfg.flat()["model.init_weights"] == str(tmp_path / "b.pt")  # an MLflow param


def test_missing_init_weights_refused_before_a_run(tmp_path, mlflow_uri, capsys):
    code = cli.main(["pretrain", PRETRAIN_QUICKSTART, "--set", "model.init_weights=missing.pt",
                     "--set", f"scaling.storage_path={tmp_path / 'ray_results'}"])  # fmt: skip
    assert code == 2
    assert f"model.init_weights={tmp_path / 'missing.pt'}: no such file" in capsys.readouterr().err
    assert _no_runs(mlflow_uri)


def test_pretraining_init_weights_of_another_arch_refused_before_a_run(tmp_path, mlflow_uri, capsys):
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    code = cli.main(["pretrain", PRETRAIN_QUICKSTART, "--set", f"model.init_weights={weights}",
                     "--set", f"scaling.storage_path={tmp_path / 'ray_results'}"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert f"model.init_weights={weights} (torchvision layout) does not fit model.arch=small_cnn" in err
    assert _no_runs(mlflow_uri) and not (tmp_path / "ray_results").exists()


def test_init_backbones_sets_both_encoders(tmp_path):
    from mocolab.moco.model import MoCo
    from mocolab.train.checkpoint import init_backbones

    net = torchvision.models.resnet18()
    torch.nn.init.normal_(net.conv1.weight)
    path = tmp_path / "official.pth.tar"
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in net.state_dict().items()}}, path)
    cfg = build_config(
        {
            "model": {"arch": "resnet18", "bn": "split", "bn_splits": 2, "init_weights": str(path)},
            "moco": {"queue_size": 64},
            "train": {"batch_size": 8},
            "scaling": {"num_workers": 1},
        }
    )
    model = MoCo.from_config(cfg, num_train_samples=64)
    assert not torch.equal(model.encoder_q.backbone.conv1.weight, net.conv1.weight)
    init_backbones(model, cfg.model.init_weights)
    for encoder in (model.encoder_q, model.encoder_k):
        assert torch.equal(encoder.backbone.conv1.weight, net.conv1.weight)
        assert torch.equal(encoder.backbone.layer4[1].bn2.running_var, net.layer4[1].bn2.running_var)
    assert torch.equal(model.encoder_k.head[0].weight, model.encoder_q.head[0].weight)


def test_export_refuses_what_detectron2_cannot_take(tmp_path, capsys):
    small = _small_cnn_backbone(tmp_path / "small.pt")
    out = tmp_path / "out.pkl"
    assert cli.main(["export", "--weights", str(small), "--format", "detectron2", "--out", str(out)]) == 2
    assert (
        "these weights are small_cnn, which detectron2 has no counterpart for. Use --format torchvision"
        in capsys.readouterr().err
    )
    cifar, _ = build_backbone(ModelConfig(arch="resnet18", cifar_stem=True, bn="plain"))
    torch.save(backbone_state_dict(cifar), tmp_path / "cifar.pt")
    assert (
        cli.main(["export", "--weights", str(tmp_path / "cifar.pt"), "--format", "detectron2", "--out", str(out)]) == 2
    )
    assert "CIFAR-stem resnet18" in capsys.readouterr().err
    assert not out.exists()
    assert (
        cli.main(["export", "--weights", str(small), "--format", "torchvision", "--out", str(tmp_path / "no" / "x.pt")])
        == 2
    )
    assert "the folder" in capsys.readouterr().err


def test_export_of_a_pretraining_run_as_torchvision_keys(tmp_path, mlflow_uri):
    cfg = build_config({"model": {"arch": "resnet18"}, "tracking": {"experiment": "exp", "run_name": "run-a"}})
    run_id, _ = tracking.start_pretrain_run(cfg)
    net = torchvision.models.resnet18()
    backbone, _ = build_backbone(cfg.model)
    backbone.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("fc.")})
    torch.save(backbone_state_dict(backbone), tmp_path / tracking.BACKBONE_ARTIFACT)
    tracking.log_file(mlflow_uri, run_id, tmp_path / tracking.BACKBONE_ARTIFACT)
    out = tmp_path / "r18.pth"
    assert cli.main(["export", "--pretrain-run", run_id, "--format", "torchvision", "--out", str(out)]) == 0
    exported = torch.load(out, weights_only=True)
    missing, unexpected = torchvision.models.resnet18().load_state_dict(exported, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    assert torch.equal(exported["layer3.1.conv2.weight"], net.state_dict()["layer3.1.conv2.weight"])
