"""The pretraining run's linear probe (``train.linear_probe``): eval.lincls's fast protocol in one process."""

import pytest
import torch

from mocolab.evaluate.probe import fit_linear_probe, probe_protocol


def blobs(n: int, classes: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 3
    labels = torch.arange(n) % classes
    return centres[labels] + spread * torch.randn(n, dim, generator=gen), labels


def test_the_probe_separates_separable_features_and_not_noise():
    train, test = blobs(600, 10, 32, 0.5, 0), blobs(200, 10, 32, 0.5, 1)
    assert fit_linear_probe(*train, *test, probe_protocol("small_cnn")) > 97
    noise = torch.randn(600, 32), torch.randint(0, 10, (600,))
    held_out = torch.randn(200, 32), torch.randint(0, 10, (200,))
    assert fit_linear_probe(*noise, *held_out, probe_protocol("small_cnn")) < 25  # chance: 10 %


def test_the_probe_is_deterministic_and_says_none_on_a_nonfinite_loss():
    train, test = blobs(300, 5, 16, 2.0, 0), blobs(100, 5, 16, 2.0, 1)
    lin = probe_protocol("resnet18")
    assert fit_linear_probe(*train, *test, lin) == fit_linear_probe(*train, *test, lin)
    broken = train[0].clone()
    broken[3, 0] = float("inf")
    assert fit_linear_probe(broken, train[1], *test, lin) is None


@pytest.mark.parametrize(
    ("arch", "protocol", "lr", "schedule"),
    [("small_cnn", "moco", 30.0, "step"), ("timm:vit_tiny_patch16_224", "v3", 3.0, "cosine")],
)
def test_the_probe_follows_the_lincls_protocol_of_the_backbone(arch, protocol, lr, schedule):
    lin = probe_protocol(arch)
    assert (lin.fast, lin.protocol, lin.lr, lin.schedule, lin.epochs, lin.batch_size) == (
        True,
        protocol,
        lr,
        schedule,
        100,
        256,
    )
