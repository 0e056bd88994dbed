"""The registry of contrastive mechanisms (``moco.mechanism``): one module per mechanism, one line here.

Each entry maps the config value to ``"module:Class"`` of a :class:`~mocolab.moco.mechanisms.base.Mechanism`,
imported only when used, so that the config schema can list the names without importing torch.
"""

from __future__ import annotations

import importlib

from mocolab.moco.mechanisms.params import EFFECTIVE_K_PARAM, NEGATIVES_PARAM

__all__ = ["EFFECTIVE_K_PARAM", "MECHANISMS", "NEGATIVES_PARAM", "build_dictionary", "mechanism_class", "run_params"]

MECHANISMS = {
    "moco": "mocolab.moco.mechanisms.queue:QueueDictionary",
    "end_to_end": "mocolab.moco.mechanisms.end_to_end:EndToEndDictionary",
    "memory_bank": "mocolab.moco.mechanisms.memory_bank:MemoryBankDictionary",
    "moco_v3": "mocolab.moco.mechanisms.moco_v3:GlobalBatchDictionary",
}


def mechanism_class(name: str):
    """The Mechanism class registered as ``name``; ValueError naming ``moco.mechanism`` if there is none."""
    if name not in MECHANISMS:
        raise ValueError(f"moco.mechanism={name!r} is not one of {', '.join(MECHANISMS)}")
    module, _, cls = MECHANISMS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_dictionary(name: str, settings):
    """The dictionary of mechanism ``name`` for ``settings`` (a DictionarySettings), after its own checks."""
    cls = mechanism_class(name)
    cls.check(settings)
    return cls.from_settings(settings)


def run_params(cfg) -> dict[str, int]:
    """What a pretraining run of ``cfg`` (a Config) logs about its mechanism beyond the config (MLflow params)."""
    from mocolab.moco.mechanisms.base import DictionarySettings

    return mechanism_class(cfg.moco.mechanism).logged_params(DictionarySettings.from_config(cfg))
