"""A minimal S3-compatible store for this piece's tests: moto's server on 127.0.0.1 in this process, with the
standard AWS environment pointing at it (the shared session fixture lives in local_servers.py)."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from typing import Iterator

import pytest

AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def moto_store(bucket: str) -> Iterator[str]:
    """Start moto's S3 server on a free port, set ``AWS_ENDPOINT_URL`` and test credentials, create ``bucket``;
    yields the endpoint. Everything is undone at exit."""
    from moto.server import ThreadedMotoServer

    from mocolab.data import location

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**AWS_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
            mp.setenv(key, value)
        location._store.cache_clear()  # filesystems opened before read the old environment
        client().create_bucket(Bucket=bucket)
        try:
            yield endpoint
        finally:
            server.stop()
            location._store.cache_clear()


def client():
    import boto3

    return boto3.client("s3")


def upload(folder: Path, uri: str) -> int:
    """Upload every file under ``folder`` to ``s3://bucket/prefix`` (``uri``); returns how many."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    s3 = client()
    for path in files:
        s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}".lstrip("/"))
    return len(files)
