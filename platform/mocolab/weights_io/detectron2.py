"""detectron2's ResNet names and its weights pickle, as MoCo's ``detection/convert-pretrain-to-detectron2.py`` writes
them.

torchvision -> detectron2: ``layerN`` -> ``res{N+1}``, stem keys (``conv1``, ``bn1``) get ``stem.``,
``bnK`` -> ``convK.norm``, ``downsample.0`` -> ``shortcut``, ``downsample.1`` -> ``shortcut.norm``. The file
is a pickle of ``{"model": {name: numpy array}, "__author__": ..., "matching_heuristics": True}``;
detectron2's checkpointer matches these names to R50-C4 / FPN modules (``backbone.res2...``,
``roi_heads.res5...``) by suffix. Pure functions; the pickle is written by :func:`write_detectron2`.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

AUTHOR = "mocolab"


def detectron2_name(key: str) -> str:
    """``layer1.0.bn1.weight`` -> ``res2.0.conv1.norm.weight``; ``conv1.weight`` -> ``stem.conv1.weight``."""
    key, is_stage = re.subn(r"^layer([1-4])\.", lambda m: f"res{int(m[1]) + 1}.", key)
    if not is_stage:
        key = "stem." + key
    key = re.sub(r"\bbn([1-3])\.", r"conv\1.norm.", key)
    return key.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")


def torchvision_name(key: str) -> str:
    """The inverse of :func:`detectron2_name`."""
    key = key.replace("shortcut.norm.", "downsample.1.").replace("shortcut.", "downsample.0.")
    key = re.sub(r"\bconv([1-3])\.norm\.", r"bn\1.", key)
    key = re.sub(r"^res([2-5])\.", lambda m: f"layer{int(m[1]) - 1}.", key)
    return key.removeprefix("stem.")


def to_detectron2(state: dict[str, torch.Tensor]) -> dict:
    """The detectron2 pickle's content for a torchvision-keyed ResNet backbone ``state``."""
    model = {detectron2_name(k): v.detach().cpu().numpy() for k, v in state.items()}
    return {"model": model, "__author__": AUTHOR, "matching_heuristics": True}


def write_detectron2(state: dict[str, torch.Tensor], out: Path) -> None:
    """Write :func:`to_detectron2` of ``state`` to ``out`` (through a temporary file, then renamed)."""
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(to_detectron2(state), f)
    os.replace(tmp, out)
