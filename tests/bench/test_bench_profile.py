"""The profiler breakdown: fractions from profiler events (pure), and from a real tiny CPU profile."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from mocolab.bench.profile import STEP_RANGE, phase_fractions, profile_step
from mocolab.bench.spec import StepSpec
from mocolab.moco.model import PHASES
from mocolab.train.step import BACKWARD_RANGE, OPTIMIZER_RANGE


def _event(
    name: str,
    cpu_us: float = 0.0,
    device_us: float = 0.0,
    self_device_us: float = 0.0,
    device_type: DeviceType = DeviceType.CPU,
    annotation: bool = False,
):
    return SimpleNamespace(
        name=name,
        cpu_time_total=cpu_us,
        device_time_total=device_us,
        self_device_time_total=self_device_us,
        device_type=device_type,
        is_user_annotation=annotation,
    )


def test_cpu_fractions_are_range_wall_times_over_the_step_ranges():
    events = [
        _event(STEP_RANGE, 500),
        _event(STEP_RANGE, 500),
        _event(PHASES["query_forward"], 200),
        _event(PHASES["key_forward"], 150),
        _event(PHASES["momentum_update"], 10),
        _event(PHASES["shuffle"], 5),
        _event(PHASES["shuffle"], 5),
        _event(PHASES["queue_update"], 20),
        _event(PHASES["loss"], 30),
        _event(BACKWARD_RANGE, 400),
        _event(OPTIMIZER_RANGE, 100),
        _event("aten::conv2d", 90),  # ops inside the ranges are not counted twice
    ]
    f = phase_fractions(events, cuda=False)
    assert f == pytest.approx(
        {
            "query_forward": 0.2,
            "momentum_update": 0.01,
            "shuffle": 0.01,
            "key_forward": 0.15,
            "loss": 0.03,
            "queue_update": 0.02,
            "optimizer": 0.1,
            "backward": 0.4,
            "other": 0.08,
        }
    )


def test_cuda_fractions_are_kernel_times_and_backward_is_the_rest():
    events = [
        _event(STEP_RANGE, cpu_us=50, device_us=300),
        _event(PHASES["query_forward"], device_us=300),
        _event(PHASES["key_forward"], device_us=100),
        _event(PHASES["momentum_update"], device_us=20),
        _event(OPTIMIZER_RANGE, device_us=80),
        _event("aten::conv2d", device_us=250, self_device_us=0),  # host op: its kernels are counted below
        _event("sm90_conv_kernel", device_us=600, self_device_us=600, device_type=DeviceType.CUDA),
        _event("sgd_kernel", device_us=400, self_device_us=400, device_type=DeviceType.CUDA),
        # the ranges' copies on the GPU timeline count neither as kernels nor as ranges
        _event(
            PHASES["query_forward"], device_us=900, self_device_us=900, device_type=DeviceType.CUDA, annotation=True
        ),
    ]
    f = phase_fractions(events, cuda=True)
    assert f["query_forward"] == pytest.approx(0.3) and f["momentum_update"] == pytest.approx(0.02)
    assert f["backward"] == pytest.approx(0.5) and f["other"] == pytest.approx(0.0)


def test_a_profile_without_step_ranges_is_refused():
    with pytest.raises(ValueError, match="no timed mocolab.step ranges"):
        phase_fractions([_event(PHASES["loss"], 10)], cuda=False)


def test_profile_of_a_tiny_cpu_step_covers_every_phase_and_sums_to_at_most_one():
    torch.set_num_threads(1)
    spec = StepSpec(arch="small_cnn", image_size=12, batch_size=8, dim=16, queue_size=32)
    f = profile_step(spec, steps=2, warmup=1)
    momentum_queue = f.pop("momentum_queue_fraction")
    assert set(f) == {*PHASES, "backward", "optimizer", "other"}
    assert all(0.0 <= v <= 1.0 for v in f.values()) and sum(f.values()) <= 1.0 + 1e-9
    assert momentum_queue == pytest.approx(f["momentum_update"] + f["queue_update"])
    # every phase of the shuffled-key queue step was seen
    assert all(f[phase] > 0 for phase in PHASES), f
