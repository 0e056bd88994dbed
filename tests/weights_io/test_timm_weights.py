"""timm backbones through the weights readers and `mocolab export --format timm`: a mocolab ViT's backbone.pt and
its timm export both pass the fit check for `model.arch=timm:...` and --weights, and timm loads the export strictly.
"""

import pytest
import timm
import torch

from mocolab.commands.export import read_source
from mocolab.config import ConfigError, build_config
from mocolab.moco.backbones import backbone_state_dict, build_backbone
from mocolab.weights_io.arch import load_checked
from mocolab.weights_io.export import export, timm_model_of

VIT = {
    "model": {"arch": "timm:vit_tiny_patch16_224", "timm_kwargs": {"depth": 1, "patch_size": 4}},
    "data": {"image_size": 16},
    "moco": {"version": "v3"},
}


@pytest.fixture
def backbone_pt(tmp_path):
    cfg = build_config(VIT)
    backbone, _ = build_backbone(cfg.model, image_size=16)
    path = tmp_path / "backbone.pt"
    torch.save(backbone_state_dict(backbone), path)
    return cfg, path


def test_timm_export_loads_strictly_in_timm_and_reads_back(backbone_pt, tmp_path):
    cfg, path = backbone_pt
    where, weights, _ = read_source(None, str(path), "sqlite:///unused.db")
    out = tmp_path / "vit.pt"
    export(weights, "timm", out, where, timm_model_of(cfg))
    content = torch.load(out, weights_only=True)
    assert content["model"] == "vit_tiny_patch16_224"
    assert content["kwargs"] == {"num_classes": 0, "img_size": 16, "depth": 1, "patch_size": 4}
    net = timm.create_model(content["model"], **content["kwargs"])
    net.load_state_dict(content["state_dict"], strict=True)
    assert torch.equal(net.pos_embed, weights.state["pos_embed"])  # the sin-cos table travels with the weights
    _, again, model = read_source(None, str(out), "sqlite:///unused.db")  # a timm export names its own model
    assert model.name == "vit_tiny_patch16_224" and again.state.keys() == weights.state.keys()


def test_backbone_pt_and_timm_export_fit_a_timm_arch(backbone_pt, tmp_path):
    cfg, path = backbone_pt
    where, weights, _ = read_source(None, str(path), "sqlite:///unused.db")
    export(weights, "timm", tmp_path / "vit.pt", where, timm_model_of(cfg))
    for source in (path, tmp_path / "vit.pt"):
        assert load_checked(source, cfg.model, "model.init_weights", image_size=16).state.keys() == weights.state.keys()
    deeper = cfg.model.model_copy(update={"timm_kwargs": {"depth": 2, "patch_size": 4}})
    with pytest.raises(ConfigError, match="does not fit model.arch=timm:vit_tiny_patch16_224.*missing"):
        load_checked(path, deeper, "model.init_weights", image_size=16)
    with pytest.raises(ConfigError, match="shapes differ.*pos_embed"):
        load_checked(path, cfg.model, "model.init_weights", image_size=32)


def test_timm_export_needs_the_model_and_weights_that_fit_it(backbone_pt, tmp_path):
    cfg, path = backbone_pt
    where, weights, model = read_source(None, str(path), "sqlite:///unused.db")
    assert model is None
    with pytest.raises(ConfigError, match="--format timm needs the timm model's name"):
        export(weights, "timm", tmp_path / "x.pt", where, None)
    other = build_config({**VIT, "model": {**VIT["model"], "timm_kwargs": {"depth": 2, "patch_size": 4}}})
    with pytest.raises(ConfigError, match="timm's vit_tiny_patch16_224 does not load these weights"):
        export(weights, "timm", tmp_path / "x.pt", where, timm_model_of(other))
    assert not (tmp_path / "x.pt").exists()


def test_the_logged_backbone_model_of_a_vit_run_holds_its_backbone_pt(backbone_pt):
    from mocolab.train.launch import backbone_module

    cfg, path = backbone_pt
    module = backbone_module(cfg, path)
    assert torch.equal(module.state_dict()["patch_embed.proj.weight"], torch.load(path)["patch_embed.proj.weight"])
