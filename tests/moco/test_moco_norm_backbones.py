"""SplitBatchNorm2d, BN conversion and the backbones (mocolab.moco.norm, mocolab.moco.backbones)."""

import copy

import pytest
import torch
import torchvision
from torch import nn

from mocolab.config import ModelConfig
from mocolab.moco.backbones import backbone_state_dict, build_backbone
from mocolab.moco.norm import SplitBatchNorm2d, convert_batchnorm


def _split_and_reference(splits=4, channels=3):
    torch.manual_seed(0)
    split = SplitBatchNorm2d(channels, splits)
    with torch.no_grad():
        split.weight.uniform_(0.5, 1.5)
        split.bias.uniform_(-0.5, 0.5)
        split.running_mean.uniform_(-1, 1)
        split.running_var.uniform_(0.5, 2)
    reference = nn.BatchNorm2d(channels)
    reference.load_state_dict(split.state_dict())
    return split, reference


def test_split_batchnorm_normalises_each_split_like_its_own_batchnorm():
    split, reference = _split_and_reference()
    x = torch.randn(16, 3, 5, 5) * 3 + 1
    out = split.train()(x)
    running_means, running_vars = [], []
    for s in range(4):  # split s holds samples s, s + 4, s + 8, ...
        bn = copy.deepcopy(reference).train()
        assert torch.allclose(out[s::4], bn(x[s::4]), atol=1e-5)
        running_means.append(bn.running_mean)
        running_vars.append(bn.running_var)
    assert torch.allclose(split.running_mean, torch.stack(running_means).mean(0), atol=1e-6)
    assert torch.allclose(split.running_var, torch.stack(running_vars).mean(0), atol=1e-6)
    assert int(split.num_batches_tracked) == 1


def test_split_batchnorm_differs_from_one_batchnorm_over_the_whole_batch():
    split, reference = _split_and_reference()
    x = torch.randn(16, 3, 5, 5)
    x[::4] += 5  # split 0 has its own statistics
    assert not torch.allclose(split.train()(x), reference.train()(x), atol=1e-3)


def test_split_batchnorm_in_eval_mode_is_plain_batchnorm():
    split, reference = _split_and_reference()
    x = torch.randn(6, 3, 5, 5)
    assert torch.allclose(split.eval()(x), reference.eval()(x), atol=1e-6)


def test_split_batchnorm_refuses_a_batch_it_cannot_split():
    split, _ = _split_and_reference(splits=4)
    with pytest.raises(ValueError, match="bn_splits=4"):
        split.train()(torch.randn(6, 3, 2, 2))


def test_convert_batchnorm_split_keeps_weights_and_key_names():
    net = torchvision.models.resnet18()
    keys_before = list(net.state_dict())
    state_before = {k: v.clone() for k, v in net.state_dict().items()}
    converted = convert_batchnorm(net, "split", 2)
    bns = [m for m in converted.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(isinstance(m, SplitBatchNorm2d) and m.num_splits == 2 for m in bns)
    assert list(converted.state_dict()) == keys_before
    assert all(torch.equal(v, state_before[k]) for k, v in converted.state_dict().items())


def test_convert_batchnorm_sync_and_plain():
    assert any(
        isinstance(m, nn.SyncBatchNorm) for m in convert_batchnorm(torchvision.models.resnet18(), "sync").modules()
    )
    plain = convert_batchnorm(torchvision.models.resnet18(), "plain")
    assert not any(isinstance(m, (SplitBatchNorm2d, nn.SyncBatchNorm)) for m in plain.modules())
    with pytest.raises(ValueError, match="model.bn='group'"):
        convert_batchnorm(plain, "group")


def test_small_cnn_returns_pooled_features():
    net, feat_dim = build_backbone(ModelConfig(arch="small_cnn", bn="split", bn_splits=2))
    assert feat_dim == 256
    assert net(torch.randn(4, 3, 24, 24)).shape == (4, 256)
    assert any(isinstance(m, SplitBatchNorm2d) for m in net.modules())


def test_resnet_cifar_stem_has_a_3x3_stride_1_stem_and_no_maxpool():
    net, feat_dim = build_backbone(ModelConfig(arch="resnet18", cifar_stem=True, bn="plain"))
    assert feat_dim == 512
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 512)


@pytest.mark.parametrize("bn", ["split", "plain"])
def test_backbone_state_dict_loads_into_torchvision_resnet18(bn):
    net, _ = build_backbone(ModelConfig(arch="resnet18", bn=bn, bn_splits=2))
    with torch.no_grad():
        net.layer1[0].bn1.running_mean.fill_(0.25)
    state = backbone_state_dict(net)
    assert "conv1.weight" in state and "layer1.0.bn1.running_mean" in state
    assert not any(key.startswith("fc.") for key in state)
    target = torchvision.models.resnet18()
    result = target.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    assert torch.all(target.layer1[0].bn1.running_mean == 0.25)


def test_cifar_stem_backbone_keys_are_torchvision_keys():
    net, _ = build_backbone(ModelConfig(arch="resnet18", cifar_stem=True, bn="split", bn_splits=2))
    expected = {k for k in torchvision.models.resnet18().state_dict() if not k.startswith("fc.")}
    assert set(backbone_state_dict(net)) == expected


def test_channels_last_backbone():
    net, _ = build_backbone(ModelConfig(arch="small_cnn", bn="plain", channels_last=True))
    weight = net.features[1][0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
