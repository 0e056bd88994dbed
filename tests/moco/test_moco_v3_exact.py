"""mocolab's MoCo v3 step against the plain reference of tests/support/moco_v3_reference.py, in float64: two training
steps
(v3 momentum schedule, v3 optimizer: LARS for the ResNet, AdamW for the ViT) on 1 and on 2 gloo ranks, for a
ResNet-18 and a 2-block timm ViT-Tiny. Compared: each step's loss and gradients, then every parameter and buffer of
both encoders and the predictor (the momentum update and the synchronised BN statistics). The reference runs in this
process, on the global batch. Also: the momentum schedule, LARS and the sin-cos table against the official formulas.
Ranks are forked from a forkserver as in test_moco_distributed.py.

How close is "to float64 round-off": the first step's loss and gradients agree to ``ROUND_OFF`` (measured: 3e-13 at
most). Later steps cannot, whatever the code: training at batch 4 amplifies round-off about a thousandfold per step
(the reference against ITSELF, with its crops scaled by ``1 + 2**-52``, moves its ResNet gradients by 2e-10 at step 0
and 6e-4 at step 3, while mocolab stays within 3e-13 and 4e-7 of it), and AdamW divides the round-off gradient of a
parameter whose true gradient is 0 (the ViT's final norm bias, shifted away by the projector's BN) by its eps. So
each later step, and the final state, must agree with the reference within ``SPREAD`` times the distance between the
reference and its own one-ulp-nudged run (and never worse than ``ROUND_OFF``): one nudge is one sample of the
round-off's spread, and the all-reduce BN of 2 ranks sums squares where torch's BN takes two passes (measured:
mocolab's largest difference is 0.001 to 1.5 times that distance). A planted bug moves the first step by > 1e-3.
"""

import copy
import socket

import moco_v3_reference as ref
import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from torch import nn
from torch.testing import assert_close

from mocolab.config import build_config
from mocolab.moco.model import MoCo
from mocolab.moco.timm_backbones import sincos_2d_position_embedding
from mocolab.moco.v3_heads import cosine_momentum
from mocolab.train.lars import LARS
from mocolab.train.step import make_optimizer

ARCHS = {"resnet": ("resnet18", {}, 16, 40.0), "vit": ("timm:vit_tiny_patch16_224", {"depth": 2}, 32, 0.3)}
BATCH, STEPS, EPOCHS = 4, 2, 2  # STEPS per epoch over EPOCHS: the momentum schedule runs its whole course
ROUND_OFF = 1e-10  # float64 (a float32 step is off by ~1e-4)
TIGHT = dict(atol=ROUND_OFF, rtol=0.0)
NUDGE = 2.0**-52  # one unit in the last place of float64
SPREAD = 10.0


def v3_config(arch, world):
    name, kwargs, size, lr = ARCHS[arch]
    return build_config(
        {
            "moco": {"version": "v3", "dim": 16, "mlp_dim": 32, "momentum": 0.9, "temperature": 0.3},
            "model": {"arch": name, "timm_kwargs": kwargs},
            "data": {"image_size": size},
            "train": {"batch_size": BATCH, "epochs": EPOCHS, "lr": lr},
            "scaling": {"num_workers": world},
        }
    )


def crops(step, world, size, nudge=0.0):
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(2, BATCH * world, 3, size, size, generator=generator, dtype=torch.float64) * (1.0 + nudge)
    return x.unbind(0)


def momentum_of(step):
    return cosine_momentum(step, STEPS, EPOCHS, 0.9)


def run_mocolab(arch, world, rank):
    """mocolab's steps on this rank's slice: global mean loss and averaged gradients per step, final state."""
    cfg = v3_config(arch, world)
    torch.manual_seed(0)
    model = MoCo.from_config(cfg, 64).double().train()
    initial = copy.deepcopy(model.state_dict())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(
        params, cfg.base_lr, cfg.train.sgd_momentum, cfg.train.weight_decay, name=cfg.train.optimizer
    )
    losses, grads = [], []
    for step in range(STEPS * EPOCHS):
        x1, x2 = (x[rank * BATCH : (rank + 1) * BATCH] for x in crops(step, world, cfg.data.image_size))
        model.momentum = momentum_of(step)
        optimizer.zero_grad()
        loss = model(x1, x2, torch.arange(BATCH)).loss
        loss.backward()
        loss = loss.detach().clone()
        if world > 1:  # what DDP does
            dist.all_reduce(loss)
            for p in params:
                dist.all_reduce(p.grad)
                p.grad /= world
        losses.append(loss / world)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        optimizer.step()
    return {"initial": initial, "losses": losses, "grads": grads, "final": model.state_dict()}


def _ref_name(name):
    """mocolab's state name -> the reference's."""
    for ours, theirs in (
        ("encoder_q.backbone.", "base_encoder.0."),
        ("encoder_q.head.", "base_encoder.1."),
        ("encoder_k.backbone.", "momentum_encoder.0."),
        ("encoder_k.head.", "momentum_encoder.1."),
    ):
        if name.startswith(ours):
            return theirs + name.removeprefix(ours)
    return name


def run_reference(arch, world, initial, nudge=0.0):
    """The reference's steps on the global batch (crops scaled by ``1 + nudge``), from mocolab's initial weights."""
    cfg = v3_config(arch, world)
    name, kwargs, size, _ = ARCHS[arch]
    vit = arch == "vit"
    if vit:
        backbone = timm.create_model(name.removeprefix("timm:"), num_classes=0, img_size=size, **kwargs)
        backbone.pos_embed = nn.Parameter(
            ref.sincos_position_embedding(backbone.patch_embed.grid_size, backbone.embed_dim), requires_grad=False
        )
        backbone.patch_embed.proj.weight.requires_grad = False  # stop_grad_conv1
        backbone.patch_embed.proj.bias.requires_grad = False
        hidden = backbone.embed_dim
    else:
        backbone = torchvision.models.resnet18()
        hidden = backbone.fc.in_features
        backbone.fc = nn.Identity()
    model = ref.ReferenceMoCoV3(backbone, hidden, 16, 32, 0.3, vit).double().train()
    if vit:  # the sin-cos table is the official one
        assert_close(initial["encoder_q.backbone.pos_embed"], model.base_encoder[0].pos_embed.detach(), **TIGHT)
    model.load_state_dict({_ref_name(k): v for k, v in initial.items()}, strict=True)
    if vit:
        optimizer = torch.optim.AdamW(model.parameters(), cfg.base_lr, weight_decay=cfg.train.weight_decay)
    else:
        optimizer = ref.LARS(model.parameters(), cfg.base_lr, weight_decay=cfg.train.weight_decay, momentum=0.9)
    losses, grads = [], []
    for step in range(STEPS * EPOCHS):
        x1, x2 = crops(step, world, size, nudge)
        m = ref.adjust_moco_momentum(step // STEPS + (step % STEPS) / STEPS, EPOCHS, 0.9)
        optimizer.zero_grad()
        loss = model(x1, x2, m)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        optimizer.step()
    return {"losses": losses, "grads": grads, "final": model.state_dict()}


def largest_difference(a, b):
    return max((x.to(y.dtype) - y).abs().max().item() for x, y in zip(a, b) if y.is_floating_point())


def round_off_bounds(reference, nudged):
    """Per step, then for the final state: the tolerance, from how far the reference's run moves when its crops move
    by one ulp."""
    steps = [
        largest_difference([a["loss"], *a["grads"].values()], [b["loss"], *b["grads"].values()])
        for a, b in zip(_steps(reference), _steps(nudged))
    ]
    final = largest_difference(reference["final"].values(), [nudged["final"][n] for n in reference["final"]])
    return [max(ROUND_OFF, SPREAD * d) for d in steps], max(ROUND_OFF, SPREAD * final)


def _steps(run):
    return [{"loss": loss, "grads": grads} for loss, grads in zip(run["losses"], run["grads"])]


def assert_same_run(ours, theirs, bounds, where):
    """Step 0 to ``ROUND_OFF``, later steps and the final state within the reference's own one-ulp spread."""
    step_bounds, final_bound = bounds
    step_bounds = [ROUND_OFF] + step_bounds[1:]
    for step, (a, b, atol) in enumerate(zip(ours["losses"], theirs["losses"], step_bounds)):
        assert_close(a, b, atol=atol, rtol=0.0, msg=lambda m: f"{where}, loss of step {step}: {m}")
    for step, (a, b, atol) in enumerate(zip(ours["grads"], theirs["grads"], step_bounds)):
        assert {_ref_name(n) for n in a} == set(b), f"{where}: trained parameters differ"
        for n, g in a.items():
            assert_close(g, b[_ref_name(n)], atol=atol, rtol=0.0, msg=lambda m: f"{where}, step {step}, grad {n}: {m}")
    final = {_ref_name(k): v for k, v in ours["final"].items()}
    assert final.keys() == theirs["final"].keys()
    for n, v in theirs["final"].items():  # momentum encoder, BN running statistics, trained weights
        assert_close(
            final[n].to(v.dtype), v, atol=final_bound, rtol=0.0, msg=lambda m: f"{where}, after the steps, {n}: {m}"
        )


def compare_with_reference(ours, arch, world, where):
    theirs = run_reference(arch, world, ours["initial"])
    bounds = round_off_bounds(theirs, run_reference(arch, world, ours["initial"], NUDGE))
    assert_same_run(ours, theirs, bounds, where)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save({arch: run_mocolab(arch, world, rank) for arch in ARCHS}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("v3gloo2")
    mp.get_context("forkserver").set_forkserver_preload([__name__])
    mp.start_processes(_worker, args=(2, _free_port(), str(out_dir)), nprocs=2, start_method="forkserver")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("arch", ARCHS)
def test_v3_step_equals_the_reference_on_one_rank(arch):
    ours = run_mocolab(arch, 1, 0)
    compare_with_reference(ours, arch, 1, f"{arch}, 1 rank")


@pytest.mark.parametrize("arch", ARCHS)
def test_v3_step_equals_the_reference_on_two_ranks(two_ranks, arch):
    rank0, rank1 = two_ranks[0][arch], two_ranks[1][arch]
    for n, v in rank0["final"].items():  # synchronised BN and averaged gradients keep the ranks identical
        assert_close(rank1["final"][n], v, **TIGHT, msg=lambda m: f"{arch}: ranks differ in {n}: {m}")
    compare_with_reference(rank0, arch, 2, f"{arch}, 2 ranks")


def test_momentum_schedule_is_the_official_formula_step_by_step():
    steps_per_epoch, epochs = 7, 3
    for step in range(steps_per_epoch * epochs + 1):
        epoch = step // steps_per_epoch + (step % steps_per_epoch) / steps_per_epoch
        expected = ref.adjust_moco_momentum(epoch, epochs, 0.99)
        assert cosine_momentum(step, steps_per_epoch, epochs, 0.99) == pytest.approx(expected, abs=1e-15)
    assert cosine_momentum(0, 7, 3, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(21, 7, 3, 0.99) == pytest.approx(1.0)


def test_lars_equals_the_official_lars_step_by_step():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3, bias=False)).double()
    with torch.no_grad():
        net[2].weight.zero_()  # a zero-norm weight: trust ratio 1
    twin = copy.deepcopy(net)
    ours = LARS(net.parameters(), lr=0.7, weight_decay=1e-3, momentum=0.9)
    theirs = ref.LARS(twin.parameters(), lr=0.7, weight_decay=1e-3, momentum=0.9)
    for step in range(4):
        x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        for model, optimizer in ((net, ours), (twin, theirs)):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
        for (n, a), b in zip(net.named_parameters(), twin.parameters()):
            assert_close(a, b, **TIGHT, msg=lambda m: f"step {step}, {n}: {m}")


def test_sincos_table_is_the_official_one():
    for grid, dim in (((2, 2), 192), ((3, 5), 8), ((14, 14), 384)):
        assert_close(sincos_2d_position_embedding(grid, dim), ref.sincos_position_embedding(grid, dim), **TIGHT)
