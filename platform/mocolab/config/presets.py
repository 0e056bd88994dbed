"""``moco.version`` as a preset: what it fills in a raw config before validation."""

from __future__ import annotations

from typing import Any

from mocolab.config.base import _is_timm_vit, set_dotted
from mocolab.config.training import TrainConfig

PRESETS: dict[str, dict[str, Any]] = {
    "v1": {"moco.mlp": False, "moco.temperature": 0.07, "data.augment": "moco_v1", "train.schedule": "step"},
    "v2": {"moco.mlp": True, "moco.temperature": 0.2, "data.augment": "moco_v2", "train.schedule": "cosine"},
    "v3": {
        "moco.mechanism": "moco_v3",
        "moco.symmetric": True,
        "moco.momentum": 0.99,
        "moco.momentum_schedule": "cosine",
        "moco.dim": 256,
        "moco.mlp_dim": 4096,
        "model.bn": "sync",
        "model.vit_sincos_pos": True,
        "model.vit_freeze_patch_proj": True,
        "data.augment": "moco_v2",
        "train.schedule": "cosine",
        "train.lr_per_256": True,
        "train.warmup_epochs": 10,
    },
}
"""``moco.version`` as a preset: the keys it sets unless the YAML or ``--set`` gives them. v1 (He et al. 2020):
linear head, T=0.07, the v1 augmentation, step lr; v2 (Chen et al. 2020): MLP head, T=0.2, blur, cosine lr;
v3 (Chen, Xie, He 2021; the official code's defaults and README recipes): no queue, symmetric loss, projector and
predictor MLPs, cosine momentum from 0.99, every BN synchronised, lr per 256 images, 10 warm-up epochs, plus
:data:`V3_ARCH_PRESETS` by backbone. Left out of v3: its asymmetric augmentations (blur 1.0/0.1, solarisation;
data.augment stays moco_v2), the ResNet's zero-init residual and the ViT's own weight init. Departures: the warm-up
(shared with v1/v2) is ``(step + 1) / warmup_steps`` where the v3 code's ``adjust_learning_rate`` starts at 0 (its
first step does not move the weights); AdamW, as in the v3 code, decays every parameter (biases, norms, the class
token and the position table too), unlike LARS, which leaves out those with ndim <= 1."""
V3_ARCH_PRESETS: dict[str, dict[str, Any]] = {
    "vit": {"moco.temperature": 0.2, "train.optimizer": "adamw", "train.lr": 1.5e-4, "train.weight_decay": 0.1},
    "other": {"moco.temperature": 1.0, "train.optimizer": "lars", "train.lr": 0.6, "train.weight_decay": 1e-6},
}
"""The v3 preset's keys that depend on ``model.arch``: a timm ViT (AdamW recipe) or any other backbone (LARS)."""
STEP_MILESTONE_FRACTIONS = (0.6, 0.8)
"""Default ``train.lr_milestones`` of the step schedule: the paper's epochs 120 and 160 of 200, scaled."""


def _raw_get(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def apply_preset(raw: dict[str, Any]) -> None:
    """Fill, in place, the keys of the ``moco.version`` preset that ``raw`` does not set (see PRESETS), and the
    step schedule's default milestones (60% and 80% of ``train.epochs``). Explicit keys always win."""
    version = _raw_get(raw, "moco.version") or "v2"
    preset = dict(PRESETS.get(version, {}))
    if version == "v3":
        preset.update(V3_ARCH_PRESETS["vit" if _is_timm_vit(_raw_get(raw, "model.arch")) else "other"])
    for dotted, value in preset.items():
        if _raw_get(raw, dotted) is None:
            set_dotted(raw, dotted, value)
    if _raw_get(raw, "train.schedule") == "step" and not _raw_get(raw, "train.lr_milestones"):
        epochs = _raw_get(raw, "train.epochs") or TrainConfig.model_fields["epochs"].default
        first = max(1, round(STEP_MILESTONE_FRACTIONS[0] * epochs))
        set_dotted(raw, "train.lr_milestones", [first, max(first + 1, round(STEP_MILESTONE_FRACTIONS[1] * epochs))])
