"""Credential masking before anything is printed, logged or stored: imports no MLflow code (and nothing of
mocolab), so the CLI and every layer can use it."""

from __future__ import annotations

import os
import re
from typing import Any

_SECRET_ENV = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD)$")
URI_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")


def redact(value: str) -> str:
    """Remove credentials from a value before it is logged: ``user:pw@`` in URIs and the values
    of environment variables named ``*KEY``, ``*SECRET``, ``*TOKEN``, ``*PASSWORD``."""
    value = URI_CREDENTIALS.sub("***@", value)
    for name, secret in os.environ.items():
        if _SECRET_ENV.search(name.upper()) and len(secret) >= 4 and secret in value:
            value = value.replace(secret, "***")
    return value


def redact_tree(tree: Any) -> Any:
    """:func:`redact` applied to every string of a nested dict/list, e.g. a config dump."""
    if isinstance(tree, str):
        return redact(tree)
    if isinstance(tree, dict):
        return {key: redact_tree(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [redact_tree(value) for value in tree]
    return tree
