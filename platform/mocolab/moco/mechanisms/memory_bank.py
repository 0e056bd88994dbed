"""``moco.mechanism=memory_bank``: InstDisc's memory bank (Wu et al. 2018), as the MoCo paper's Figure 2b.

Faithful to InstDisc where the MoCo paper's comparison is:
- one stored, L2-normalised embedding per training image (buffer ``bank [N, dim]``, random unit rows at start);
- a query's positive is its own image's stored row *as it was before this step's update*: no key encoder and
  no key pass (the second crop is not used);
- the K negatives are rows drawn uniformly (with replacement) per mini-batch, shared by its queries, never a
  row of an image in the (global) batch, so a query never meets its own image as a negative;
- after the loss, each image's row moves to ``normalize(0.5 * row + 0.5 * query)`` (``moco.bank_momentum``)
  from this step's query embedding, for exactly the step's images of every worker (gathered).

Deviations from InstDisc, each as in the MoCo paper's reimplementation: the loss is InfoNCE with temperature
``moco.temperature`` over 1 + K logits (InstDisc used NCE with a normalising constant), the negatives are shared
per mini-batch (InstDisc drew them per sample), and there is no proximal regularisation (the MoCo paper compares
mechanisms under the same loss and no extra terms). Every worker holds the same bank: the updates are gathered
from all workers and each worker draws its own negatives with its own RNG (checkpointed with the run).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mocolab.moco.distributed import gather_all
from mocolab.moco.functional import infonce_logits, memory_bank_update_, sample_excluding
from mocolab.moco.mechanisms.base import DictionarySettings, Embeddings, Keys, KeySource, LogitsAndLabels, Mechanism


class MemoryBankDictionary(Mechanism):
    """InstDisc's memory bank with ``num_negatives`` (``moco.queue_size``) negatives per mini-batch."""

    name = "memory_bank"
    key_source = KeySource.STORED

    def __init__(self, num_samples: int, dim: int, num_negatives: int, momentum: float = 0.5) -> None:
        super().__init__()
        self.num_negatives = num_negatives
        self.momentum = momentum
        self.register_buffer("bank", F.normalize(torch.randn(num_samples, dim), dim=1))

    @classmethod
    def check(cls, settings: DictionarySettings) -> None:
        """One query per image (no key crop), and enough images besides the batch to draw negatives from."""
        if settings.symmetric:
            raise ValueError(
                "moco.symmetric=true needs a key crop per direction; moco.mechanism=memory_bank scores each query "
                "against its image's stored row; set moco.symmetric=false"
            )
        n = settings.num_train_samples
        if n is None:
            return
        candidates = n - settings.global_batch
        if candidates < 1 or settings.queue_size > candidates:
            raise ValueError(
                f"moco.queue_size={settings.queue_size} negatives per step need as many training images outside the "
                f"global batch of {settings.global_batch}; the memory bank has {n} images, so use "
                f"moco.queue_size <= {max(candidates, 0)} (or a larger training set)"
            )

    @classmethod
    def from_settings(cls, settings: DictionarySettings) -> MemoryBankDictionary:
        if settings.num_train_samples is None:
            raise ValueError("moco.mechanism=memory_bank needs the training set size (one bank row per image)")
        return cls(settings.num_train_samples, settings.dim, settings.queue_size, settings.bank_momentum)

    def forward(self, queries: Embeddings, keys: Keys, index: torch.Tensor, temperature: float) -> LogitsAndLabels:
        (q,) = queries
        index = index.to(self.bank.device, non_blocking=True)
        batch_rows = gather_all(index)
        positives = self.bank.index_select(0, index)  # copies: the rows as stored before this step's update
        negatives = self.bank.index_select(0, sample_excluding(self.bank.shape[0], batch_rows, self.num_negatives))
        logits, labels = infonce_logits(q, positives, negatives, temperature)
        memory_bank_update_(self.bank, batch_rows, gather_all(q.detach()), self.momentum)
        return logits, labels
