"""``moco.mechanism=moco``: MoCo's FIFO queue of momentum-encoder keys (the paper's Figure 2c)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from mocolab.moco.distributed import gather_all
from mocolab.moco.functional import enqueue_, infonce_logits
from mocolab.moco.mechanisms.base import (
    DictionarySettings,
    Embeddings,
    Keys,
    KeySource,
    LogitsAndLabels,
    Mechanism,
    zeros_labels,
)

# torch.profiler ranges of the step's phases done here (``mocolab bench`` breaks the step down by them).
QUEUE_UPDATE_RANGE = "mocolab.queue_update"
LOSS_RANGE = "mocolab.loss"


class QueueDictionary(Mechanism):
    """MoCo's queue: buffers ``queue [K, dim]`` (normalised random at start) and ``queue_ptr [1]`` (next row
    to overwrite). The keys of all workers are gathered and enqueued, so every worker holds the same queue.

    The step's logits use the queue as it was before the step's keys entered it, without copying it: the keys
    are written first, and the rows they replaced (a copy of only those rows) stand in for them in the logits.
    """

    name = "moco"
    key_source = KeySource.MOMENTUM_ENCODER

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self._ptr = 0  # host copy of queue_ptr: the step never reads the buffer back (no device sync)

    @classmethod
    def from_settings(cls, settings: DictionarySettings) -> QueueDictionary:
        return cls(settings.queue_size, settings.dim)

    @classmethod
    def check(cls, settings: DictionarySettings) -> None:
        """The queue must hold a whole number of steps' keys (global batch, twice with moco.symmetric)."""
        per_step = settings.global_batch * settings.directions
        if settings.queue_size % per_step:
            what = f"twice the global batch {per_step}" if settings.symmetric else f"the global batch {per_step}"
            raise ValueError(
                f"moco.queue_size={settings.queue_size} is not a multiple of {what} (train.batch_size x "
                f"scaling.num_workers{'; with moco.symmetric both crops enqueue keys' if settings.symmetric else ''}); "
                f"use e.g. {max(1, settings.queue_size // per_step) * per_step}"
            )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ptr = int(self.queue_ptr)

    def forward(self, queries: Embeddings, keys: Keys, index: torch.Tensor, temperature: float) -> LogitsAndLabels:
        with record_function(QUEUE_UPDATE_RANGE):
            fresh = torch.cat([gather_all(k) for k in keys])
            start, count = self._ptr, fresh.shape[0]
            evicted = self.queue[start : start + count].clone()
            self._ptr = enqueue_(self.queue, start, fresh)
            self.queue_ptr.fill_(self._ptr)
        with record_function(LOSS_RANGE):
            negatives = (self.queue[:start], evicted, self.queue[start + count :])
            logits = torch.cat([infonce_logits(q, k, negatives, temperature)[0] for q, k in zip(queries, keys)])
        return logits, zeros_labels(logits.shape[0], logits)
