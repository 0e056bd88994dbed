"""Step throughput: mocolab's MoCo training step against the plain reference loop, side by side.

mocolab's step is the training loop's own :class:`~mocolab.train.step.TrainStep`: ``MoCo.forward`` (query forward,
fused momentum update, key forward with shuffle-BN, InfoNCE, enqueue) under the spec's autocast precision,
``zero_grad(set_to_none=True)``, backward (GradScaler for fp16), SGD step. Inputs are fixed synthetic crops
already on the device, so data loading is excluded (``data.py`` times it); the gradient all-reduce and the rest
of a real epoch are compared with a plain DDP launcher in ``launcher.py``. Torch only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from mocolab.bench.reference import ReferenceMoCo, reference_step_fn
from mocolab.bench.spec import StepSpec
from mocolab.bench.spread import Spread
from mocolab.bench.timing import interleaved_rates
from mocolab.moco.backbones import make_backbone
from mocolab.moco.mechanisms import build_dictionary
from mocolab.moco.mechanisms.base import DictionarySettings
from mocolab.moco.mechanisms.queue import QueueDictionary
from mocolab.moco.model import Encoder, MoCo
from mocolab.train.step import TrainStep, make_optimizer

StepFn = Callable[[], object]
REFERENCE = "reference"


def build_model(spec: StepSpec) -> MoCo:
    """mocolab's MoCo for ``spec`` on its device, in training mode, weights drawn from ``spec.seed``. Its queue
    checks its size against the batch as in a run (a ValueError naming ``moco.queue_size``)."""
    torch.manual_seed(spec.seed)
    bn = "plain" if spec.bn == "shuffle" else spec.bn  # shuffle: one worker's share (see spec.py)
    backbone, feat_dim = make_backbone(spec.arch, spec.cifar_stem, bn, spec.bn_splits, spec.channels_last)
    settings = DictionarySettings(spec.queue_size, spec.dim, global_batch=spec.batch_size)
    model = MoCo(
        Encoder(backbone, feat_dim, spec.dim, spec.mlp),
        build_dictionary(QueueDictionary.name, settings),  # the reference loop's algorithm
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


def train_step(spec: StepSpec) -> TrainStep:
    """The training loop's step (model, SGD, autocast, fp16 GradScaler) for ``spec``."""
    model = build_model(spec)
    params = (p for p in model.parameters() if p.requires_grad)
    optimizer = make_optimizer(params, spec.lr, spec.sgd_momentum, spec.weight_decay, spec.amp)
    return TrainStep(model, optimizer, spec.amp, torch.device(spec.device).type)


def mocolab_contender(spec: StepSpec) -> StepFn:
    """One training step of mocolab's model on the spec's synthetic batch, as the training loop runs it."""
    step = train_step(spec)
    batch = synthetic_batch(spec)
    return lambda: step(*batch)


def reference_contender(spec: StepSpec) -> StepFn:
    """The reference loop on the same network, initial weights, queue and batch as ``spec``: fp32,
    contiguous (channels-first) memory format, eager, as in the paper's code."""
    plain = spec.replace(precision="fp32", channels_last=False, compile=False)
    source = build_model(plain)
    reference = ReferenceMoCo(
        source.encoder_q, source.dictionary.queue, spec.momentum, spec.temperature, shuffle=source.shuffle_keys
    )
    del source
    step = reference_step_fn(reference.to(spec.device).train(), spec.lr, spec.sgd_momentum, spec.weight_decay)
    im_q, im_k, _ = synthetic_batch(plain)
    return lambda: step(im_q, im_k)


@dataclass(frozen=True)
class StepComparison:
    """Images/s of each contender (mocolab specs by name, ``reference``, extras) on one device, per repetition."""

    rates: dict[str, list[float]]
    batch_size: int

    @property
    def img_s(self) -> dict[str, float]:
        """Median images/s of each contender."""
        return {name: Spread.of(values).median for name, values in self.rates.items()}

    def ratio(self, name: str, over: str = REFERENCE) -> Spread | None:
        """Throughput of ``name`` over ``over``'s, per repetition (fractions: 1.2 = 20% faster), or None if ``over``
        did not run. Both ran in every repetition, back to back, so each repetition's ratio is a fair pair."""
        if over not in self.rates:
            return None
        return Spread.of([a / b for a, b in zip(self.rates[name], self.rates[over])])


def compare_steps(
    specs: Mapping[str, StepSpec],
    with_reference: bool = True,
    steps: int = 10,
    repeats: int = 5,
    warmup: int = 3,
    extra: Mapping[str, StepFn] | None = None,
) -> StepComparison:
    """Time mocolab's step for each spec, the reference loop for the first spec's sizes and the ``extra``
    contenders (each call handles one batch of the specs' batch size) in this process, interleaved. All specs must
    share device and batch size."""
    first = next(iter(specs.values()))
    if any(s.device != first.device or s.batch_size != first.batch_size for s in specs.values()):
        raise ValueError("compare_steps: every spec must use the same device and batch size")
    contenders: dict[str, StepFn] = {name: mocolab_contender(spec) for name, spec in specs.items()}
    if with_reference:
        contenders[REFERENCE] = reference_contender(first)
    contenders.update(extra or {})
    rates = interleaved_rates(
        contenders, first.batch_size, steps=steps, repeats=repeats, warmup=warmup, device=torch.device(first.device)
    )
    return StepComparison(rates, first.batch_size)
