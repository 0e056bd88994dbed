"""What every contrastive mechanism declares: where its keys come from, its own rules, its effective K.

A mechanism is the *dictionary* of the paper's Figure 2: an ``nn.Module`` called once per step as
``dictionary(queries, keys, index, temperature) -> (logits, labels)`` with one or two directions
(``queries[d]`` pairs with ``keys[d]``; two for ``moco.symmetric``). It returns the logits of all directions
stacked along the batch and their labels (the positive's column: 0 for v1/v2, the own key's row of the global
batch for v3) and updates its state for the step.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from mocolab.moco.mechanisms.params import EFFECTIVE_K_PARAM, NEGATIVES_PARAM

Embeddings = Sequence[torch.Tensor]  # one [B, dim] tensor per direction
Keys = Embeddings | None  # None for a mechanism whose keys are STORED
LogitsAndLabels = tuple[torch.Tensor, torch.Tensor]


class KeySource(enum.Enum):
    """Which network encodes the keys a mechanism receives (``MoCo`` runs the key pass accordingly)."""

    MOMENTUM_ENCODER = "momentum encoder (no gradient)"  # MoCo: a slowly moving copy of the query encoder
    QUERY_ENCODER = "query encoder (with gradient)"  # end-to-end: keys are back-propagated too
    STORED = "stored in the dictionary"  # memory bank: no key pass; ``keys`` is None


@dataclass(frozen=True)
class DictionarySettings:
    """The settings a mechanism reads (from ``moco.*``, the global batch and the training set size).

    ``num_train_samples`` is None where the training set has not been counted yet (config validation);
    rules that need it run in the driver's pre-flight step and when the dictionary is built."""

    queue_size: int  # moco.queue_size
    dim: int  # moco.dim
    global_batch: int  # train.batch_size x scaling.num_workers
    symmetric: bool = False  # moco.symmetric: two directions per step
    bank_momentum: float = 0.5  # moco.bank_momentum
    num_train_samples: int | None = None

    @property
    def directions(self) -> int:
        return 2 if self.symmetric else 1

    @classmethod
    def from_config(cls, cfg, num_train_samples: int | None = None) -> DictionarySettings:
        """The settings of a :class:`mocolab.config.Config` (duck-typed: ``moco``, ``global_batch``)."""
        moco = cfg.moco
        return cls(moco.queue_size, moco.dim, cfg.global_batch, moco.symmetric, moco.bank_momentum, num_train_samples)


def zeros_labels(rows: int, like: torch.Tensor) -> torch.Tensor:
    """InfoNCE labels: the positive is column 0 of every row."""
    return torch.zeros(rows, dtype=torch.long, device=like.device)


class Mechanism(nn.Module, abc.ABC):
    """Base of the dictionaries registered in :mod:`mocolab.moco.mechanisms`.

    A subclass sets ``name`` (the ``moco.mechanism`` value) and ``key_source``, and implements ``check``
    (its rules; ValueError naming the field and the fix), ``effective_k`` (the dictionary size, logged as the
    ``effective_k`` param; default ``moco.queue_size``), ``from_settings`` and ``forward``. Every other fact the
    platform needs about a mechanism is a class attribute or class method here, with a default: nothing outside
    ``moco/`` (and the schema's list of names) knows a mechanism by its name."""

    name: ClassVar[str]
    key_source: ClassVar[KeySource]
    uses_predictor: ClassVar[bool] = False  # MoCo v3: queries pass a predictor MLP; projector and predictor heads
    cost_factor: ClassVar[float] = 1.0
    """Training time per image relative to ``moco``'s queue (``reproduce/estimate.py``'s per-trial estimate)."""

    @classmethod
    def loss_scale(cls, temperature: float) -> float:
        """Factor of each direction's mean cross-entropy in the loss (1; MoCo v3: ``2 T``)."""
        return 1.0

    @classmethod
    def check(cls, settings: DictionarySettings) -> None:
        """Raise ValueError naming the field and the fix when ``settings`` cannot run; rules that need the
        training set size are skipped while ``settings.num_train_samples`` is None."""

    @classmethod
    def effective_k(cls, settings: DictionarySettings) -> int:
        """The dictionary size K as the paper's Figure 3 counts it (the x axis of its mechanism comparison):
        ``moco.queue_size`` unless the mechanism says otherwise."""
        return settings.queue_size

    @classmethod
    def negatives(cls, settings: DictionarySettings) -> int:
        """Negatives per query (the logits' columns - 1): ``effective_k`` unless K counts the positive too."""
        return cls.effective_k(settings)

    @classmethod
    def logged_params(cls, settings: DictionarySettings) -> dict[str, int]:
        """What a pretraining run logs about its mechanism (MLflow params; tables group by ``effective_k``,
        ``reproduce``'s ``loss_to_chance`` divides by ``ln(1 + negatives)``)."""
        return {EFFECTIVE_K_PARAM: cls.effective_k(settings), NEGATIVES_PARAM: cls.negatives(settings)}

    @classmethod
    @abc.abstractmethod
    def from_settings(cls, settings: DictionarySettings) -> Mechanism:
        """The dictionary for ``settings`` (after :meth:`check`)."""

    @abc.abstractmethod
    def forward(self, queries: Embeddings, keys: Keys, index: torch.Tensor, temperature: float) -> LogitsAndLabels:
        """The step's logits ``[directions x B, 1 + K]`` and labels; updates the dictionary."""
