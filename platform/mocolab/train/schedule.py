"""The pretraining loop's per-step schedules: the learning-rate factor and the key encoder's momentum."""

from __future__ import annotations

import math
from collections.abc import Callable

from mocolab.config import Config, TrainConfig


def lr_factor(step: int, steps_per_epoch: int, train: TrainConfig) -> float:
    """Multiplier of ``train.lr`` at iteration ``step`` (0-based): linear warmup over
    ``train.warmup_epochs``, then cosine to 0 over the remaining epochs, or step decay by
    ``train.lr_decay`` at each of ``train.lr_milestones`` (epochs)."""
    warmup_steps = train.warmup_epochs * steps_per_epoch
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    epoch = step / steps_per_epoch
    if train.schedule == "cosine":
        span = max(train.epochs - train.warmup_epochs, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min((epoch - train.warmup_epochs) / span, 1.0)))
    return train.lr_decay ** sum(int(epoch) >= m for m in train.lr_milestones)


def momentum_schedule(cfg: Config, steps_per_epoch: int) -> Callable[[int], float] | None:
    """The key encoder's momentum at each global step: ``moco.warmup_momentum`` for the first
    ``moco.momentum_warmup_epochs``, then ``moco.momentum``, or with ``moco.momentum_schedule=cosine`` v3's
    schedule (raised from ``moco.momentum`` to 1 over ``train.epochs``); None for one constant momentum."""
    moco = cfg.moco
    if moco.momentum_schedule == "constant" and not moco.momentum_warmup_epochs:
        return None
    from mocolab.moco.v3_heads import cosine_momentum

    warmup_steps = moco.momentum_warmup_epochs * steps_per_epoch

    def momentum_at(step: int) -> float:
        if step < warmup_steps:
            return moco.warmup_momentum
        if moco.momentum_schedule == "cosine":
            return cosine_momentum(step, steps_per_epoch, cfg.train.epochs, moco.momentum)
        return moco.momentum

    return momentum_at
