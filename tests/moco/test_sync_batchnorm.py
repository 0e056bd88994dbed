"""AllReduceBatchNorm2d (synchronised BN over gloo) against BatchNorm2d on the global batch: one process, and two
real gloo ranks (torch.multiprocessing, no Ray) whose batches differ in size and in image size."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from mocolab.moco.norm import AllReduceBatchNorm2d, to_allreduce_batchnorm

C = 3
# rank r's batch: different batch sizes and spatial sizes, so that count weighting matters
SHAPES = [(2, C, 5, 4), (1, C, 3, 6)]


def _inputs() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=gen) * 3 + 1 for shape in SHAPES]


def _reference(inputs, weight, bias):
    """BatchNorm2d on all the pixels of all ranks at once (flattened to one row of pixels per channel),
    with ``sum_r (out_r * probe_r).sum()`` as the loss; returns outputs, input grads, weight/bias grads, stats."""
    bn = nn.BatchNorm2d(C)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    xs = [x.clone().requires_grad_(True) for x in inputs]
    flat = torch.cat([x.permute(1, 0, 2, 3).reshape(C, -1) for x in xs], dim=1)  # [C, all pixels]
    out_flat = bn(flat.t().reshape(-1, C, 1, 1)).reshape(-1, C).t()
    outs, start = [], 0
    for x in xs:
        n = x.numel() // C
        outs.append(out_flat[:, start : start + n].reshape(C, x.shape[0], *x.shape[2:]).permute(1, 0, 2, 3))
        start += n
    loss = sum((o * _probe(o.shape, r)).sum() for r, o in enumerate(outs))
    loss.backward()
    return {
        "out": [o.detach() for o in outs],
        "grad_x": [x.grad for x in xs],
        "grad_weight": bn.weight.grad,
        "grad_bias": bn.bias.grad,
        "running_mean": bn.running_mean,
        "running_var": bn.running_var,
    }


def _probe(shape, rank: int) -> torch.Tensor:
    """A fixed, rank-specific upstream gradient (a plain sum would give zero input gradients through BN)."""
    return torch.linspace(-1, 1, int(torch.tensor(shape).prod())).reshape(shape) * (rank + 1)


def _weight_bias():
    return torch.tensor([1.5, 0.5, -1.0]), torch.tensor([0.1, -0.2, 0.3])


def test_one_process_is_batchnorm2d():
    x = _inputs()[0]
    weight, bias = _weight_bias()
    plain, synced = nn.BatchNorm2d(C), AllReduceBatchNorm2d(C)
    for bn in (plain, synced):
        with torch.no_grad():
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
    assert torch.equal(synced(x), plain(x))
    assert torch.equal(synced.running_var, plain.running_var)
    synced.eval(), plain.eval()
    assert torch.equal(synced(x), plain(x))


def test_conversion_keeps_weights_statistics_and_frozen_parameters():
    model = nn.Sequential(nn.Conv2d(3, C, 1), nn.BatchNorm2d(C), nn.Sequential(nn.BatchNorm2d(C)), FrozenBatchNorm2d(C))
    model[1].running_mean.fill_(2.0)
    model[1].weight.requires_grad_(False)
    model.eval()
    converted = to_allreduce_batchnorm(model)
    assert type(converted[1]) is AllReduceBatchNorm2d and type(converted[2][0]) is AllReduceBatchNorm2d
    assert type(converted[3]) is FrozenBatchNorm2d
    assert torch.equal(converted[1].running_mean, torch.full((C,), 2.0))
    assert not converted[1].weight.requires_grad and converted[1].bias.requires_grad
    assert not converted[1].training
    assert set(converted.state_dict()) == set(model.state_dict())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(SHAPES))
    try:
        weight, bias = _weight_bias()
        bn = AllReduceBatchNorm2d(C)
        with torch.no_grad():
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
        x = _inputs()[rank].requires_grad_(True)
        out = bn(x)
        (out * _probe(out.shape, rank)).sum().backward()
        torch.save(
            {
                "out": out.detach(),
                "grad_x": x.grad,
                "grad_weight": bn.weight.grad,
                "grad_bias": bn.bias.grad,
                "running_mean": bn.running_mean,
                "running_var": bn.running_var,
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gloo-bn")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=len(SHAPES), join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(len(SHAPES))]


def test_two_gloo_ranks_normalise_with_the_global_batch(ranks):
    ref = _reference(_inputs(), *_weight_bias())
    for r, got in enumerate(ranks):
        assert torch.allclose(got["out"], ref["out"][r], atol=1e-5), r
        assert torch.allclose(got["running_mean"], ref["running_mean"], atol=1e-6)
        assert torch.allclose(got["running_var"], ref["running_var"], atol=1e-5)


def test_two_gloo_ranks_get_the_gradients_of_the_global_loss(ranks):
    """Each rank's input gradient includes what the other rank's loss sends through the shared statistics;
    the weight/bias gradients summed over ranks (what DDP averages) are the global batch's."""
    ref = _reference(_inputs(), *_weight_bias())
    for r, got in enumerate(ranks):
        assert torch.allclose(got["grad_x"], ref["grad_x"][r], atol=1e-5), r
    assert torch.allclose(ranks[0]["grad_weight"] + ranks[1]["grad_weight"], ref["grad_weight"], atol=1e-4)
    assert torch.allclose(ranks[0]["grad_bias"] + ranks[1]["grad_bias"], ref["grad_bias"], atol=1e-4)
