"""The dictionary of keys per ``moco.mechanism``, all behind one call:

``dictionary(queries, keys, index, temperature) -> (logits, labels)`` takes one or two directions
(``queries[d]`` pairs with ``keys[d]``; two for ``moco.symmetric``), returns the logits of all directions
stacked along the batch (positive at column 0, labels zeros) and updates the dictionary for the step.

- ``moco``: a FIFO queue of momentum-encoder keys (:class:`QueueDictionary`);
- ``end_to_end``: the keys of the global batch, with gradient (:class:`EndToEndDictionary`);
- ``memory_bank``: one stored key per training image, K drawn per step (:class:`MemoryBankDictionary`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from mocolab.moco.distributed import gather_all, gather_all_with_grad, rank
from mocolab.moco.functional import enqueue_, in_batch_logits, infonce_logits, memory_bank_update_


# torch.profiler ranges of the step's phases done here (``mocolab bench`` breaks the step down by them).
QUEUE_UPDATE_RANGE = "mocolab.queue_update"
LOSS_RANGE = "mocolab.loss"


def _zeros_labels(rows: int, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(rows, dtype=torch.long, device=like.device)


class QueueDictionary(nn.Module):
    """MoCo's queue: buffers ``queue [K, dim]`` (normalised random at start) and ``queue_ptr [1]`` (next row
    to overwrite). The keys of all workers are gathered and enqueued, so every worker holds the same queue.

    The step's logits use the queue as it was before the step's keys entered it, without copying it: the keys
    are written first, and the rows they replaced (a copy of only those rows) stand in for them in the logits.
    """

    def __init__(self, size: int, dim: int, keys_per_step: int | None = None) -> None:
        super().__init__()
        if keys_per_step is not None:
            self.check(size, keys_per_step)
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self._ptr = 0  # host copy of queue_ptr: the step never reads the buffer back (no device sync)

    @staticmethod
    def check(size: int, keys_per_step: int) -> None:
        """Raise ValueError unless the queue holds a whole number of steps' keys."""
        if size % keys_per_step:
            raise ValueError(
                f"moco.queue_size={size} is not a multiple of the {keys_per_step} keys enqueued per step "
                f"(global batch, x2 with moco.symmetric); use {max(1, size // keys_per_step) * keys_per_step}"
            )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ptr = int(self.queue_ptr)

    def forward(
        self, queries: Sequence[torch.Tensor], keys: Sequence[torch.Tensor], index: torch.Tensor, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with record_function(QUEUE_UPDATE_RANGE):
            fresh = torch.cat([gather_all(k) for k in keys])
            start, count = self._ptr, fresh.shape[0]
            evicted = self.queue[start : start + count].clone()
            self._ptr = enqueue_(self.queue, start, fresh)
            self.queue_ptr.fill_(self._ptr)
        with record_function(LOSS_RANGE):
            negatives = (self.queue[:start], evicted, self.queue[start + count :])
            logits = torch.cat([infonce_logits(q, k, negatives, temperature)[0] for q, k in zip(queries, keys)])
        return logits, _zeros_labels(logits.shape[0], logits)


class EndToEndDictionary(nn.Module):
    """End-to-end: the dictionary is the global batch of keys, encoded with gradient by the query encoder and
    gathered with gradient; each query's positive is its own key, the other ``global batch - 1`` keys are its
    negatives (K = global batch). Holds no state."""

    def forward(
        self, queries: Sequence[torch.Tensor], keys: Sequence[torch.Tensor], index: torch.Tensor, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = []
        for q, k in zip(queries, keys):
            everything = gather_all_with_grad(k)
            own = rank() * k.shape[0] + torch.arange(k.shape[0], device=k.device)
            blocks.append(in_batch_logits(q, everything, own, temperature)[0])
        logits = torch.cat(blocks)
        return logits, _zeros_labels(logits.shape[0], logits)


class MemoryBankDictionary(nn.Module):
    """InstDisc's memory bank: buffer ``bank [N_train, dim]`` (normalised random at start), replicated on every
    worker. Each step draws ``num_negatives`` rows uniformly (with replacement) as negatives shared by the batch,
    then the rows of the step's samples (gathered from all workers) move towards the fresh keys with
    ``momentum`` and are renormalised. With two directions the fresh key of a sample is the mean of its two."""

    def __init__(self, num_samples: int, dim: int, num_negatives: int, momentum: float = 0.5) -> None:
        super().__init__()
        self.check(num_samples, num_negatives)
        self.num_negatives = num_negatives
        self.momentum = momentum
        self.register_buffer("bank", F.normalize(torch.randn(num_samples, dim), dim=1))

    @staticmethod
    def check(num_samples: int, num_negatives: int) -> None:
        """Raise ValueError unless the bank has samples and at least ``num_negatives`` of them."""
        if num_samples < 1:
            raise ValueError(f"moco.mechanism=memory_bank needs the training set size; got {num_samples} samples")
        if num_negatives > num_samples:
            raise ValueError(
                f"moco.queue_size={num_negatives} negatives per step exceed the {num_samples} training samples of "
                f"the memory bank; use moco.queue_size <= {num_samples}"
            )

    def forward(
        self, queries: Sequence[torch.Tensor], keys: Sequence[torch.Tensor], index: torch.Tensor, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        drawn = torch.randint(self.bank.shape[0], (self.num_negatives,), device=self.bank.device)
        negatives = self.bank.index_select(0, drawn)
        logits = torch.cat([infonce_logits(q, k, negatives, temperature)[0] for q, k in zip(queries, keys)])
        fresh = F.normalize(torch.stack([k.detach() for k in keys]).mean(dim=0), dim=1)
        rows = gather_all(index.to(self.bank.device, non_blocking=True))
        memory_bank_update_(self.bank, rows, gather_all(fresh), self.momentum)
        return logits, _zeros_labels(logits.shape[0], logits)


def keys_per_step(cfg) -> int:
    """Keys that enter the dictionary per step: the global batch, twice with ``moco.symmetric``."""
    return cfg.global_batch * (2 if cfg.moco.symmetric else 1)


def check_mechanism(cfg, num_train_samples: int) -> None:
    """The rules of ``cfg.moco.mechanism`` that need the training set size (``num_train_samples``): cheap, so a
    launcher can call it before any worker starts. Raises ValueError naming the field and the fix."""
    if cfg.moco.mechanism == "moco":
        QueueDictionary.check(cfg.moco.queue_size, keys_per_step(cfg))
    elif cfg.moco.mechanism == "memory_bank":
        MemoryBankDictionary.check(num_train_samples, cfg.moco.queue_size)
    elif cfg.moco.mechanism != "end_to_end":
        raise ValueError(f"moco.mechanism={cfg.moco.mechanism!r} is not one of moco, end_to_end, memory_bank")


def build_dictionary(cfg, num_train_samples: int) -> nn.Module:
    """The dictionary module of ``cfg.moco.mechanism``; raises ValueError naming the field on a bad setting."""
    check_mechanism(cfg, num_train_samples)
    moco = cfg.moco
    if moco.mechanism == "moco":
        return QueueDictionary(moco.queue_size, moco.dim, keys_per_step(cfg))
    if moco.mechanism == "memory_bank":
        return MemoryBankDictionary(num_train_samples, moco.dim, moco.queue_size, moco.bank_momentum)
    if "queue_size" in moco.model_fields_set:
        warnings.warn(
            f"moco.queue_size={moco.queue_size} is ignored by moco.mechanism=end_to_end: its dictionary is the "
            f"global batch (K = {cfg.global_batch}); vary train.batch_size x scaling.num_workers instead",
            stacklevel=2,
        )
    return EndToEndDictionary()
