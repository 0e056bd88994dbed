"""``moco.mechanism=moco_v3``: MoCo v3's dictionary (Chen, Xie, He 2021; the official code's ``moco/builder.py``).

No queue: the keys are the momentum encoder's embeddings of the *global* batch (all-gathered, no gradient), and
each query's positive is the key of its own image's other crop (label ``rank * B + i``). Both crops are queries
(``moco.symmetric``); each direction's cross-entropy is scaled by ``2 T`` and the two are summed. The projector
and predictor MLPs and the momentum schedule live in ``moco/v3_heads.py``, ``MoCo`` and the training loop.
"""

from __future__ import annotations

import torch

from mocolab.moco.distributed import gather_all, rank
from mocolab.moco.mechanisms.base import DictionarySettings, Embeddings, Keys, KeySource, LogitsAndLabels, Mechanism


class GlobalBatchDictionary(Mechanism):
    """The momentum keys of the global batch: logits ``[directions x B, global batch]`` (every key of the
    global batch, in rank order) and labels pointing at each query's own key. Holds no state."""

    name = "moco_v3"
    key_source = KeySource.MOMENTUM_ENCODER
    uses_predictor = True

    @classmethod
    def check(cls, settings: DictionarySettings) -> None:
        """Both crops are queries, as in the v3 code."""
        if not settings.symmetric:
            raise ValueError("moco.mechanism=moco_v3 uses both crops as queries; set moco.symmetric=true")

    @classmethod
    def effective_k(cls, settings: DictionarySettings) -> int:
        return settings.global_batch  # the keys of the global batch, own key included

    @classmethod
    def negatives(cls, settings: DictionarySettings) -> int:
        return settings.global_batch - 1  # every key of the global batch but the query's own

    @classmethod
    def loss_scale(cls, temperature: float) -> float:
        """Each direction's cross-entropy times ``2 T`` (the v3 code's ``contrastive_loss``)."""
        return 2.0 * temperature

    @classmethod
    def from_settings(cls, settings: DictionarySettings) -> GlobalBatchDictionary:
        return cls()

    def forward(self, queries: Embeddings, keys: Keys, index: torch.Tensor, temperature: float) -> LogitsAndLabels:
        logits, labels = [], []
        for q, k in zip(queries, keys):
            everything = gather_all(k)
            logits.append((q / temperature) @ everything.T)
            labels.append(rank() * q.shape[0] + torch.arange(q.shape[0], device=q.device))
        return torch.cat(logits), torch.cat(labels)
