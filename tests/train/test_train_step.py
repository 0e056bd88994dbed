"""The training step (``train/step.py``) on CPU: amp modes bf16 / fp16 (GradScaler) / off, channels_last, compile,
and the deferred finiteness check."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mocolab.bench.spec import AMP_OF_PRECISION, StepSpec
from mocolab.bench.step import synthetic_batch, train_step
from mocolab.train.step import LossWatch, TrainStep, check_amp

TINY = StepSpec(
    arch="small_cnn",
    image_size=12,
    batch_size=8,
    bn="split",
    bn_splits=2,
    dim=16,
    queue_size=32,
    momentum=0.9,
    temperature=0.2,
)
PRECISION_OF_AMP = {amp: precision for precision, amp in AMP_OF_PRECISION.items()}


def _train_step(spec: StepSpec, amp: str) -> TrainStep:
    return train_step(spec.replace(precision=PRECISION_OF_AMP[amp]))


def _params(step: TrainStep) -> list[torch.Tensor]:
    return [p.detach().clone() for p in step.model.encoder_q.parameters()]


@pytest.mark.parametrize("amp, dtype", [("off", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_each_amp_mode_runs_the_encoders_at_its_precision_and_trains(amp, dtype):
    torch.set_num_threads(1)
    step = _train_step(TINY, amp)
    seen = []
    step.model.encoder_q.backbone.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    before = _params(step)
    losses = [step(*synthetic_batch(TINY)) for _ in range(2)]  # fp16: the scaler skips the first step (overflow)
    assert seen == [dtype, dtype]
    assert all(loss.dtype == torch.float32 and math.isfinite(float(loss)) and not loss.requires_grad for loss in losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, _params(step)))  # the optimizer stepped
    assert step.scaler.is_enabled() == (amp == "fp16")
    assert bool(step.optimizer.defaults["fused"]) == (amp == "fp16")  # fp16: the scaler's inf check stays on device


def test_fp16_grad_scaler_skips_a_step_whose_gradients_are_not_finite_and_lowers_its_scale():
    torch.set_num_threads(1)
    im_q, im_k, index = synthetic_batch(TINY)
    poisoned = im_q * float("inf")
    fp16, fp32 = _train_step(TINY, "fp16"), _train_step(TINY, "off")
    scale = fp16.scaler.get_scale()
    before = _params(fp16)
    assert not math.isfinite(float(fp16(poisoned, im_k, index)))
    assert all(torch.equal(a, b) for a, b in zip(before, _params(fp16)))  # skipped
    assert fp16.scaler.get_scale() == scale * 0.5
    fp32(poisoned, im_k, index)
    assert not all(torch.isfinite(p).all() for p in _params(fp32))  # without a scaler the step is taken
    assert fp16.scaler.state_dict()["scale"] == scale * 0.5 and fp32.scaler.state_dict() == {}


def test_check_amp_names_the_field():
    with pytest.raises(ValueError, match="train.amp='fp8' is not one of bf16, fp16, off"):
        check_amp("fp8")


def test_channels_last_step_matches_the_contiguous_one():
    torch.set_num_threads(1)
    batch = synthetic_batch(TINY)
    plain, channels_last = _train_step(TINY, "off"), _train_step(TINY.replace(channels_last=True), "off")
    for _ in range(2):
        torch.manual_seed(5)
        loss_plain = plain(*batch)
        torch.manual_seed(5)
        torch.testing.assert_close(channels_last(*batch), loss_plain, rtol=1e-4, atol=1e-4)
    weight = next(channels_last.model.encoder_q.backbone.parameters())
    assert weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow  # inductor compiles the encoders with the C++ compiler: minutes on 2 loaded CPUs
def test_compiled_step_matches_the_eager_one():
    torch.set_num_threads(2)
    batch = synthetic_batch(TINY)
    eager, compiled = _train_step(TINY, "off"), _train_step(TINY.replace(compile=True), "off")
    for _ in range(2):
        torch.manual_seed(5)
        loss_eager = eager(*batch)
        torch.manual_seed(5)
        torch.testing.assert_close(compiled(*batch), loss_eager, rtol=1e-4, atol=1e-4)


def test_loss_watch_sums_on_the_device_and_names_the_first_nonfinite_step():
    watch = LossWatch(torch.device("cpu"))
    for step, loss in enumerate([1.0, 3.0, float("nan"), float("inf"), 2.0], start=40):
        watch.add(torch.tensor(loss), step)
        if step == 41:
            assert watch.first_nonfinite_step() is None and watch.mean() == 2.0
    assert watch.first_nonfinite_step() == 42  # not 43, and not the step of the check
    assert math.isnan(watch.mean())


def test_loss_watch_add_never_reads_back_to_the_host():
    """``add`` must only queue device work: a tensor subclass that refuses host reads goes through it."""

    class NoHostRead(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func in (
                torch.Tensor.item,
                torch.Tensor.__bool__,
                torch.Tensor.__float__,
                torch.Tensor.__int__,
                torch.Tensor.tolist,
            ):
                raise AssertionError(f"host read: {func.__name__}")
            return super().__torch_function__(func, types, args, kwargs or {})

    watch = LossWatch(torch.device("cpu"))
    watch.add(torch.tensor(1.5).as_subclass(NoHostRead), 0)
    watch.add(torch.tensor(float("nan")).as_subclass(NoHostRead), 1)
    plain = copy.copy(watch)
    plain.first_bad, plain.total = plain.first_bad.as_subclass(torch.Tensor), plain.total.as_subclass(torch.Tensor)
    assert plain.first_nonfinite_step() == 1


@pytest.mark.parametrize(
    ("train", "kind", "lr"),
    [
        ({"optimizer": "sgd", "lr": 0.03}, torch.optim.SGD, 0.03),
        ({"optimizer": "adamw", "lr": 1.5e-4, "lr_per_256": True, "batch_size": 512}, torch.optim.AdamW, 3e-4),
    ],
)
def test_run_optimizer_is_train_optimizer_at_the_peak_lr(train, kind, lr):
    from mocolab.config import build_config
    from mocolab.train.pretrain import run_optimizer

    cfg = build_config({"model": {"arch": "small_cnn", "bn": "split"}, "train": train, "scaling": {"num_workers": 1}})
    model = torch.nn.Linear(2, 2)
    model.bias.requires_grad_(False)
    optimizer = run_optimizer(model, cfg)
    assert type(optimizer) is kind and optimizer.param_groups[0]["lr"] == pytest.approx(lr)
    assert optimizer.param_groups[0]["params"] == [model.weight]
