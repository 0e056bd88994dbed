"""Weights layouts: which program wrote a checkpoint, and how its keys map to a torchvision-keyed backbone.

One table, :data:`LAYOUTS`: each row names a layout and renames one key of its state dict to the
torchvision backbone key (``conv1.weight``, ``layer4.1.bn2.running_var``; small_cnn: ``features.*``) or
drops it (``None``: the key belongs to something else, such as the key encoder or a projection head).
:func:`find_layout` looks for the state dict at the top level of a loaded checkpoint and one level down
(``state_dict``, ``model``, ``resnet18_parameters``, ...), strips DataParallel / ``torch.compile``
wrappers (``module.``, ``_orig_mod.``) and takes the first row whose renamed keys hold a backbone stem.
The classifier or MLP head of the encoder (``fc.*``) is dropped. Pure functions on dicts of tensors.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mocolab.weights_io.detectron2 import torchvision_name

STEM_KEYS = ("conv1.weight", "features.0.0.weight", "patch_embed.proj.weight")  # a ResNet's, small_cnn's, timm ViT's
WRAPPERS = ("module.", "_orig_mod.")
HEAD_PREFIX = "fc."
# torchvision ResNet children in order: conv1, bn1, relu, maxpool, layer1..layer4, avgpool, fc; lightly's
# examples keep nn.Sequential(*list(resnet.children())[:-1]), whose keys are these indices.
SEQUENTIAL_RESNET = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def _under(prefix: str) -> Callable[[str], str | None]:
    """Keys under ``prefix``, without it; other keys are not the backbone's."""
    return lambda key: key[len(prefix) :] if key.startswith(prefix) else None


def _sequential_resnet(prefix: str) -> Callable[[str], str | None]:
    """Keys of a torchvision ResNet kept as ``nn.Sequential(*children()[:-1])`` under ``prefix``."""

    def rename(key: str) -> str | None:
        if not key.startswith(prefix):
            return None
        index, _, rest = key[len(prefix) :].partition(".")
        return f"{SEQUENTIAL_RESNET[index]}.{rest}" if index in SEQUENTIAL_RESNET and rest else None

    return rename


def _detectron2(key: str) -> str | None:
    return torchvision_name(key) if re.match(r"(stem|res[2-5])\.", key) else None


@dataclass(frozen=True)
class Layout:
    """A checkpoint layout: ``name`` (reported), ``description`` (what writes it) and ``rename``."""

    name: str
    description: str
    rename: Callable[[str], str | None] = field(repr=False)


LAYOUTS: tuple[Layout, ...] = (
    Layout("mocolab-checkpoint", "mocolab checkpoint.pt: model -> encoder_q.backbone.*", _under("encoder_q.backbone.")),
    Layout(
        "moco-official",
        "official MoCo v1/v2 .pth.tar: state_dict -> module.encoder_q.* (head fc.* dropped)",
        _under("encoder_q."),
    ),
    Layout("moco-v3-official", "official MoCo v3 ResNet: state_dict -> module.base_encoder.*", _under("base_encoder.")),
    Layout(
        "solo-learn",
        "solo-learn checkpoint, or any model holding a torchvision ResNet as .backbone: state_dict -> backbone.*",
        _under("backbone."),
    ),
    Layout(
        "lightly",
        "lightly model around nn.Sequential(*resnet.children()[:-1]): backbone.0.*, backbone.4.0.* ...",
        _sequential_resnet("backbone."),
    ),
    Layout(
        "lightly-backbone",
        "lightly backbone saved alone, e.g. {'resnet18_parameters': backbone.state_dict()}: 0.*, 4.0.* ...",
        _sequential_resnet(""),
    ),
    Layout(
        "detectron2",
        "detectron2 pickle (mocolab export, MoCo's convert-pretrain-to-detectron2.py): model -> stem.*, res2-5.*",
        _detectron2,
    ),
    Layout(
        "torchvision",
        "torchvision-keyed state_dict: mocolab backbone.pt, torchvision or timm ResNet (conv1.*, layer1-4.*, fc.* "
        "dropped; small_cnn: features.*), a timm ViT (patch_embed.*; also mocolab export --format timm)",
        lambda key: key,
    ),
)


@dataclass
class BackboneWeights:
    """A backbone's weights found in a checkpoint: torchvision keys, the layout, what was left out."""

    layout: Layout
    state: dict[str, torch.Tensor] = field(repr=False)
    container: str | None = None  # the top-level key holding the state dict; None: the top level itself
    dropped_head: list[str] = field(default_factory=list)  # the encoder's fc.* keys
    ignored: list[str] = field(default_factory=list)  # keys of other parts (key encoder, projector, queue, ...)

    def summary(self) -> str:
        """One line: layout, tensor count, what was dropped."""
        where = f" ({self.container})" if self.container else ""
        line = f"layout {self.layout.name}{where}: {len(self.state)} backbone tensors"
        if self.dropped_head:
            line += f", head fc.* dropped ({len(self.dropped_head)})"
        if self.ignored:
            parts = sorted({strip_wrappers(k).split(".")[0] for k in self.ignored})
            more = ", ..." if len(parts) > 6 else ""
            line += f", other entries ignored ({len(self.ignored)}: {', '.join(parts[:6])}{more})"
        return line


class UnknownLayoutError(ValueError):
    """No layout of :data:`LAYOUTS` matches; the message lists them and the keys that were seen."""


def strip_wrappers(key: str) -> str:
    """``module._orig_mod.conv1.weight`` -> ``conv1.weight`` (DataParallel/DDP and torch.compile prefixes)."""
    while True:
        wrapper = next((w for w in WRAPPERS if key.startswith(w)), None)
        if wrapper is None:
            return key
        key = key[len(wrapper) :]


def _containers(obj: Any) -> list[tuple[str | None, dict]]:
    """The dicts that may hold the state dict: the object itself, then its dict values."""
    if not isinstance(obj, dict):
        return []
    found: list[tuple[str | None, dict]] = [(None, obj)]
    found += [(str(k), v) for k, v in obj.items() if isinstance(v, dict)]
    return found


def _apply(layout: Layout, entries: dict) -> BackboneWeights | None:
    state, head, ignored = {}, [], []
    for raw_key, value in entries.items():
        if not isinstance(raw_key, str) or not isinstance(value, torch.Tensor):
            continue
        key = layout.rename(strip_wrappers(raw_key))
        if key is None:
            ignored.append(raw_key)
        elif key.startswith(HEAD_PREFIX):
            head.append(raw_key)
        else:
            state[key] = value
    if not any(stem in state for stem in STEM_KEYS):
        return None
    return BackboneWeights(layout, state, dropped_head=head, ignored=ignored)


def find_layout(obj: Any) -> BackboneWeights:
    """The backbone weights in a loaded checkpoint ``obj`` (first matching container, then first matching
    row of :data:`LAYOUTS`). Raises UnknownLayoutError listing the known layouts and the keys seen."""
    for container, entries in _containers(obj):
        for layout in LAYOUTS:
            found = _apply(layout, entries)
            if found is not None:
                found.container = container
                return found
    raise UnknownLayoutError(unknown_layout_message(obj))


def _sample(keys: list, n: int = 8) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)} key{'s' if len(keys) != 1 else ''})"


def unknown_layout_message(obj: Any) -> str:
    """What was seen and what is known, for a checkpoint no layout matches."""
    if isinstance(obj, dict):
        seen = f"its top-level keys are {_sample(list(obj))}"
        nested = [(k, v) for k, v in obj.items() if isinstance(v, dict) and v]
        if nested:
            name, inner = max(nested, key=lambda kv: len(kv[1]))
            seen += f"; {name!r} holds {_sample(list(inner), 5)}"
    else:
        seen = f"it holds a {type(obj).__name__}, not a dict"
    known = "\n    ".join(f"{layout.name}: {layout.description}" for layout in LAYOUTS)
    return (
        f"unknown weights layout: {seen}. Known layouts (a ResNet or small_cnn backbone, found at the top level "
        f"or one level down):\n    {known}"
    )
