"""What every part of the schema shares: the error, the section base, dotted keys and location text."""

from __future__ import annotations

import os
import re
from typing import Any

from pydantic import BaseModel, ConfigDict

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
"""Run names: they become folders under ``scaling.storage_path`` (no ``/``, no ``..``)."""


class ConfigError(ValueError):
    """A config that cannot run; the message names the field and how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


TIMM_PREFIX = "timm:"


def _is_timm_vit(arch: Any) -> bool:
    if not isinstance(arch, str) or not arch.startswith(TIMM_PREFIX):
        return False
    from mocolab.moco.timm_backbones import is_vit_name

    return is_vit_name(arch.removeprefix(TIMM_PREFIX))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a.b": value}``; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree["a"]["b"] = value`` for ``dotted="a.b"``, creating sections as needed."""
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is a value, not a section")
        node = child
    node[leaf] = value


def is_uri(location: Any) -> bool:
    """True for object-store URIs (``s3://``, ``gs://``, ...); False for local/NFS paths and ``file://``."""
    return "://" in str(location) and not str(location).startswith("file://")


def _as_text(v: Any) -> Any:
    """A ``pathlib.Path`` given for a location field, as text (locations are strings: URIs stay as given)."""
    return str(v) if isinstance(v, os.PathLike) else v


def _names_a_location(v: str | None) -> str | None:
    scheme, sep, rest = (v or "").partition("://")
    if sep and is_uri(v) and not rest.strip("/"):
        raise ValueError(f"{v} names no bucket; use {scheme}://BUCKET/prefix")
    return v
