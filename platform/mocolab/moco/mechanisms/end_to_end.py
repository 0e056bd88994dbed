"""``moco.mechanism=end_to_end``: the dictionary is the global batch of keys, back-propagated (Figure 2a)."""

from __future__ import annotations

import torch

from mocolab.moco.distributed import gather_all_with_grad, rank
from mocolab.moco.functional import in_batch_logits
from mocolab.moco.mechanisms.base import (
    DictionarySettings,
    Embeddings,
    Keys,
    KeySource,
    LogitsAndLabels,
    Mechanism,
    zeros_labels,
)


class EndToEndDictionary(Mechanism):
    """End-to-end: the keys of the global batch, encoded with gradient by the query encoder and gathered with
    gradient; each query's positive is its own key, the other ``global batch - 1`` keys are its negatives.
    ``moco.queue_size`` is not used: K is the global batch. Holds no state."""

    name = "end_to_end"
    key_source = KeySource.QUERY_ENCODER
    cost_factor = 1.5  # the keys are back-propagated too

    @classmethod
    def effective_k(cls, settings: DictionarySettings) -> int:
        return settings.global_batch  # the paper's Figure 3: K = mini-batch size (own key included)

    @classmethod
    def negatives(cls, settings: DictionarySettings) -> int:
        return settings.global_batch - 1  # every key of the global batch but the query's own

    @classmethod
    def from_settings(cls, settings: DictionarySettings) -> EndToEndDictionary:
        return cls()

    def forward(self, queries: Embeddings, keys: Keys, index: torch.Tensor, temperature: float) -> LogitsAndLabels:
        blocks = []
        for q, k in zip(queries, keys):
            everything = gather_all_with_grad(k)
            own = rank() * k.shape[0] + torch.arange(k.shape[0], device=k.device)
            blocks.append(in_batch_logits(q, everything, own, temperature)[0])
        logits = torch.cat(blocks)
        return logits, zeros_labels(logits.shape[0], logits)
