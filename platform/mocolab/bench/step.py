"""Step throughput: mocolab's MoCo training step against the plain reference loop, side by side.

mocolab's step is what ``train/pretrain.py`` runs per batch: ``MoCo.forward`` (query forward, fused
momentum update, key forward with shuffle-BN, InfoNCE, enqueue) under bf16 autocast when asked,
``zero_grad(set_to_none=True)``, backward, SGD step. Inputs are fixed synthetic crops already on the
device, so data loading is excluded (``data.py`` times it); the loop's per-step loss all-reduce and
finiteness check, like the gradient all-reduce, are platform costs (``overhead.py``). Torch only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Optional

import torch
from torch.profiler import record_function

from mocolab.bench.reference import ReferenceMoCo, reference_step_fn
from mocolab.bench.spec import StepSpec
from mocolab.bench.timing import interleaved_throughput
from mocolab.moco.backbones import make_backbone
from mocolab.moco.mechanisms import build_dictionary
from mocolab.moco.mechanisms.base import DictionarySettings
from mocolab.moco.model import Encoder, MoCo

StepFn = Callable[[], torch.Tensor]
REFERENCE = "reference"
BACKWARD_RANGE = "mocolab.backward"
OPTIMIZER_RANGE = "mocolab.optimizer_step"


def build_model(spec: StepSpec) -> MoCo:
    """mocolab's MoCo for ``spec`` on its device, in training mode, weights drawn from ``spec.seed``. Its queue
    checks its size against the batch as in a run (a ValueError naming ``moco.queue_size``)."""
    torch.manual_seed(spec.seed)
    bn = "plain" if spec.bn == "shuffle" else spec.bn  # shuffle: one worker's share (see spec.py)
    backbone, feat_dim = make_backbone(spec.arch, spec.cifar_stem, bn, spec.bn_splits, spec.channels_last)
    settings = DictionarySettings(spec.queue_size, spec.dim, global_batch=spec.batch_size)
    model = MoCo(
        Encoder(backbone, feat_dim, spec.dim, spec.mlp),
        build_dictionary("moco", settings),
        momentum=spec.momentum,
        temperature=spec.temperature,
        shuffle_keys=spec.bn == "shuffle" or (spec.bn == "split" and spec.bn_splits > 1),
        channels_last=spec.channels_last,
        compile=spec.compile,
    )
    return model.to(spec.device).train()


def synthetic_batch(spec: StepSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two random crops ``[B, 3, S, S]`` and their indices, on the device (the same every call for a spec)."""
    generator = torch.Generator().manual_seed(spec.seed + 1)
    shape = (spec.batch_size, 3, spec.image_size, spec.image_size)
    im_q, im_k = (torch.randn(shape, generator=generator).to(spec.device) for _ in range(2))
    return im_q, im_k, torch.arange(spec.batch_size, device=spec.device)


def make_optimizer(model: MoCo, spec: StepSpec) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=spec.lr, momentum=spec.sgd_momentum, weight_decay=spec.weight_decay)


def mocolab_step_fn(model: MoCo, optimizer: torch.optim.Optimizer, spec: StepSpec) -> StepFn:
    """One training step of ``model`` on the spec's synthetic batch, as the training loop runs it (backward and
    optimizer step marked as profiler ranges for ``profile.py``)."""
    im_q, im_k, index = synthetic_batch(spec)
    device_type = torch.device(spec.device).type
    use_bf16 = spec.precision == "bf16"

    def step() -> torch.Tensor:
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(im_q, im_k, index).loss
        with record_function(BACKWARD_RANGE):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with record_function(OPTIMIZER_RANGE):
            optimizer.step()
        return loss.detach()

    return step


def reference_contender(spec: StepSpec) -> StepFn:
    """The reference loop on the same network, initial weights, queue and batch as ``spec``: fp32,
    contiguous (channels-first) memory format, eager, as in the paper's code."""
    plain = spec.replace(precision="fp32", channels_last=False, compile=False)
    source = build_model(plain)
    reference = ReferenceMoCo(source.encoder_q, source.dictionary.queue, spec.momentum, spec.temperature,
                              shuffle=source.shuffle_keys)
    del source
    step = reference_step_fn(reference.to(spec.device).train(), spec.lr, spec.sgd_momentum, spec.weight_decay)
    im_q, im_k, _ = synthetic_batch(plain)
    return lambda: step(im_q, im_k)


def mocolab_contender(spec: StepSpec) -> StepFn:
    model = build_model(spec)
    return mocolab_step_fn(model, make_optimizer(model, spec), spec)


@dataclass(frozen=True)
class StepComparison:
    """Median images/s of each contender (mocolab specs by name, and ``reference``) on one device."""

    img_s: dict[str, float]
    batch_size: int

    def ratio(self, name: str) -> Optional[float]:
        """Throughput of ``name`` over the reference's (a fraction: 1.2 = 20% faster)."""
        if REFERENCE not in self.img_s:
            return None
        return self.img_s[name] / self.img_s[REFERENCE]


def compare_steps(
    specs: Mapping[str, StepSpec], with_reference: bool = True, steps: int = 10, repeats: int = 5, warmup: int = 3
) -> StepComparison:
    """Time mocolab's step for each spec (and the reference loop for the first spec's sizes) in this process,
    interleaved, and return the median throughputs. All specs must share device and batch size."""
    first = next(iter(specs.values()))
    if any(s.device != first.device or s.batch_size != first.batch_size for s in specs.values()):
        raise ValueError("compare_steps: every spec must use the same device and batch size")
    contenders: dict[str, StepFn] = {name: mocolab_contender(spec) for name, spec in specs.items()}
    if with_reference:
        contenders[REFERENCE] = reference_contender(first)
    rates = interleaved_throughput(
        contenders, first.batch_size, steps=steps, repeats=repeats, warmup=warmup, device=torch.device(first.device)
    )
    return StepComparison(rates, first.batch_size)
