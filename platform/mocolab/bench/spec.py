"""What one benchmarked step is: arch, sizes, MoCo hyper-parameters, precision, device. Plain values only.

``StepSpec`` is built from a validated ``Config`` by the ``mocolab bench`` command, or directly from
arguments by ``platform/benchmarks/step_bench.py`` on machines that have torch but not pydantic
(the GPU check); ``bench/step.py`` builds mocolab's own ``MoCo`` from it through the model's explicit
constructor, so this module and the step benchmark import nothing but torch.

``bn="shuffle"`` is one worker's share of shuffle-BN: the key batch is shuffled, encoded with BN over the
local batch and unshuffled; the cross-worker exchange is absent on one process.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Any, Literal

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS = ("fp32", "bf16", "fp16")
AMP_OF_PRECISION = {"fp32": "off", "bf16": "bf16", "fp16": "fp16"}  # precision -> train.amp
BN_MODES = ("shuffle", "split", "plain")


@dataclass(frozen=True)
class StepSpec:
    """One MoCo training step on one worker (the ``moco`` mechanism: queue of ``queue_size`` keys)."""

    arch: str = "small_cnn"
    image_size: int = 32
    batch_size: int = 32
    cifar_stem: bool = False
    bn: str = "shuffle"  # shuffle (one worker's share, see above), split (SplitBatchNorm) or plain
    bn_splits: int = 1
    dim: int = 128
    queue_size: int = 4096
    momentum: float = 0.999
    temperature: float = 0.2
    mlp: bool = True
    lr: float = 0.03
    sgd_momentum: float = 0.9
    weight_decay: float = 1e-4
    precision: Precision = "fp32"  # fp32, or autocast to bf16 / fp16 (with a GradScaler) as train.amp does
    channels_last: bool = False
    compile: bool = False
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.bn not in BN_MODES:
            raise ValueError(f"bn={self.bn!r} is not one of {', '.join(BN_MODES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.bn == "split" and self.batch_size % self.bn_splits:
            raise ValueError(f"bn_splits={self.bn_splits} must divide batch_size={self.batch_size}")

    def replace(self, **changes: Any) -> StepSpec:
        return dataclasses.replace(self, **changes)

    @property
    def amp(self) -> str:
        """The ``train.amp`` value of this precision."""
        return AMP_OF_PRECISION[self.precision]


CONFIG_FIELDS = {
    "arch": "model.arch",
    "image_size": "data.image_size",
    "batch_size": "train.batch_size",
    "cifar_stem": "model.cifar_stem",
    "dim": "moco.dim",
    "queue_size": "moco.queue_size",
    "momentum": "moco.momentum",
    "temperature": "moco.temperature",
    "mlp": "moco.mlp",
    "lr": "train.lr",
    "sgd_momentum": "train.sgd_momentum",
    "weight_decay": "train.weight_decay",
    "compile": "model.compile",
    "seed": "train.seed",
}
"""StepSpec fields copied from the config as they are (field -> dotted config key)."""


def spec_from_config(cfg, device: str, precision: str | None = None) -> StepSpec:
    """The step one worker of ``cfg`` runs, on ``device``. ``precision`` defaults to what the training loop
    runs: ``train.amp`` (off = fp32). ``model.bn=shuffle`` becomes one worker's share of it; ``sync`` (BN
    statistics over all workers, no shuffle) becomes plain BN. Raises ValueError for settings the benchmark does
    not cover."""
    from mocolab.moco.mechanisms.queue import QueueDictionary

    if cfg.moco.mechanism != QueueDictionary.name or cfg.moco.symmetric:
        raise ValueError(
            f"the step benchmark covers moco.mechanism={QueueDictionary.name} with moco.symmetric=false "
            f"(the reference loop's algorithm); got mechanism={cfg.moco.mechanism}, symmetric={cfg.moco.symmetric}"
        )
    cuda = device.startswith("cuda")
    if precision is None:
        precision = {amp: name for name, amp in AMP_OF_PRECISION.items()}[cfg.train.amp]
    bn = {"sync": "plain"}.get(cfg.model.bn, cfg.model.bn)
    splits = cfg.model.bn_splits if bn == "split" else 1
    channels_last = cuda if cfg.model.channels_last is None else cfg.model.channels_last
    copied = {field: operator.attrgetter(path)(cfg) for field, path in CONFIG_FIELDS.items()}
    return StepSpec(**copied, bn=bn, bn_splits=splits, precision=precision, channels_last=channels_last, device=device)
