"""Check ``scaling.storage_path`` before any compute is spent.

Ray Train writes checkpoints there. A local or NFS folder is created if missing and must be writable
with room for checkpoints; a URI such as ``s3://bucket/prefix`` is passed through unchanged to Ray,
which opens it with pyarrow's filesystem (credentials come from the environment, never the config).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from mocolab.config import ConfigError
from mocolab.data.location import is_uri

MIN_FREE_BYTES = 1 << 30  # room for a few ResNet-50 checkpoints (~200 MB each with optimizer state)

_FIX = "point scaling.storage_path at a writable folder with free space, or at shared storage (s3://bucket/prefix)"


def is_remote(storage_path: str) -> bool:
    """True for URIs (``s3://``, ``gs://``, ...) that Ray opens with pyarrow; False for local/NFS paths."""
    return is_uri(storage_path)


def _human(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n_bytes < 1024 or unit == "TiB":
            return f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    raise AssertionError("unreachable")


def check_storage_path(storage_path: str, min_free_bytes: int = MIN_FREE_BYTES) -> str:
    """Make sure Ray can write checkpoints to ``storage_path``; return the path to give Ray.

    A local folder (or ``file://`` URI) is created if missing, probed with a real write and checked for
    ``min_free_bytes`` of free space; a read-only, unwritable or full location raises ConfigError naming
    ``scaling.storage_path``, the path and the fix. Remote URIs are returned unchanged."""
    if is_remote(storage_path):
        return storage_path
    folder = Path(storage_path.removeprefix("file://"))
    where = f"scaling.storage_path={storage_path}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".mocolab-write-probe-") as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        reason = {
            errno.EROFS: "is on a read-only filesystem",
            errno.EACCES: "is not writable (permission denied)",
            errno.EPERM: "is not writable (permission denied)",
            errno.ENOSPC: "is full (no space left on device)",
            errno.EDQUOT: "is full (disk quota exceeded)",
            errno.ENOTDIR: "is not a folder",
            errno.EEXIST: "is not a folder",
        }.get(err.errno, f"cannot be written ({err.strerror or err})")
        raise ConfigError(f"{where} {reason}; {_FIX}") from None
    free = shutil.disk_usage(folder).free
    if free < min_free_bytes:
        raise ConfigError(
            f"{where} has only {_human(free)} free, checkpoints need at least {_human(min_free_bytes)}; {_FIX}"
        )
    return storage_path
