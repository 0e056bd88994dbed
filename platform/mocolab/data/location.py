"""Where data lives: a local or NFS path, or an object-store URI (``s3://bucket/prefix``, ``gs://...``).

Every read of a dataset goes through :func:`filesystem`, which opens URIs with pyarrow's filesystems (the ones Ray
Train and Ray Data use). Endpoint and credentials come from the standard environment of the process that reads:
``AWS_ENDPOINT_URL`` (an S3-compatible store), ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``, or the node's role; never from configs, params or tags.
"""

from __future__ import annotations

import functools
import posixpath
from urllib.parse import urlsplit

from pyarrow import fs as pafs

from mocolab.config import is_uri

__all__ = ["filesystem", "is_uri", "join", "kind", "list_files", "read_bytes"]


@functools.lru_cache(maxsize=16)
def _store(scheme: str, bucket: str) -> pafs.FileSystem:
    """One pyarrow filesystem per bucket and process (opening one resolves the region and credentials)."""
    filesystem, _ = pafs.FileSystem.from_uri(f"{scheme}://{bucket}")
    return filesystem


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow filesystem, path inside it)`` for a URI (``bucket/prefix``) or a local path (absolute)."""
    location = str(location)
    if not is_uri(location):
        return pafs.LocalFileSystem(), posixpath.abspath(location.removeprefix("file://"))
    parts = urlsplit(location)
    return _store(parts.scheme, parts.netloc), f"{parts.netloc}{parts.path}".rstrip("/")


def join(location: str, *names: str) -> str:
    """``location/name/...`` for a URI or a path (a URI keeps its scheme)."""
    return posixpath.join(str(location), *names)


def relative(location: str, root: str) -> str:
    """The part of ``location`` under ``root`` (``train/cat/1.png``), for URIs and paths alike, without asking the
    filesystem (``posixpath.relpath`` would resolve a URI against the working directory)."""
    prefix = str(root).rstrip("/") + "/"
    if not str(location).startswith(prefix):
        raise ValueError(f"{location} is not under {root}")
    return str(location)[len(prefix) :]


def read_bytes(location: str) -> bytes:
    """The whole file or object at ``location``."""
    store, path = filesystem(location)
    with store.open_input_file(path) as stream:
        return stream.readall()


def kind(location: str) -> str:
    """``"dir"``, ``"file"`` or ``"missing"`` (an object-store prefix with objects under it is a ``"dir"``)."""
    store, path = filesystem(location)
    info = store.get_file_info(path)
    return {pafs.FileType.Directory: "dir", pafs.FileType.File: "file"}.get(info.type, "missing")


def list_files(location: str) -> list[str]:
    """Every file under ``location`` at any depth, as locations of the same kind, in path order (none for a missing
    location). Files and folders whose names start with ``.`` are left out (as the local folder walk does)."""
    store, root = filesystem(location)
    infos = store.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    found = []
    for info in infos:
        under = relative(info.path, root)
        if info.type == pafs.FileType.File and not any(part.startswith(".") for part in under.split("/")):
            found.append(join(location, under))
    return sorted(found)
