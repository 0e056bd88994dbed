"""The tracking store: whether it can be used (checked before any run exists), and clients on it."""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from mocolab.config import ConfigError
from mocolab.tracking.masking import URI_CREDENTIALS, redact

if TYPE_CHECKING:  # mlflow is imported where it is used
    from mlflow import MlflowClient

SQLITE_HEADER = b"SQLite format 3\x00"


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, naming the URI (credentials masked), when the tracking store cannot be used: a server that
    does not answer ``/health`` within ``timeout_s``, a PostgreSQL database that refuses a connection (clients may
    use one directly), a sqlite file in a missing or read-only folder or that is not a database, a plain folder
    (MLflow 3's refused file store)."""
    fix = "set tracking.tracking_uri / MLFLOW_TRACKING_URI to a reachable server or sqlite:///PATH"
    if uri.split("://", 1)[0].split("+", 1)[0] == "postgresql":
        _check_postgres(uri, timeout_s, fix)
    elif uri.startswith(("http://", "https://")):
        health = URI_CREDENTIALS.sub("", uri).rstrip("/") + "/health"  # urllib cannot take user:pw@host
        try:
            with urllib.request.urlopen(health, timeout=timeout_s) as resp:
                if resp.status != 200:
                    raise OSError(f"HTTP {resp.status}")
        except (OSError, urllib.error.URLError) as err:
            raise ConfigError(
                f"MLflow tracking server {redact(uri)} is unreachable ({err}); start it or {fix}"
            ) from None
    elif uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
            raise ConfigError(
                f"MLflow store {redact(uri)}: folder {path.parent} does not exist or is not writable; "
                "fix tracking.tracking_uri or MLFLOW_TRACKING_URI"
            )
        if path.is_dir() or (path.is_file() and path.stat().st_size and not _is_sqlite(path)):
            raise ConfigError(f"MLflow store {redact(uri)}: {path} is not a SQLite database; {fix}")
    elif "://" not in uri or uri.startswith("file:"):
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
            raise ConfigError(
                f"MLflow store {redact(uri)} is a plain folder (the file store), which MLflow 3 refuses; "
                f"use sqlite:///{uri.removeprefix('file://').rstrip('/') or '.'}/mlflow.db or {fix}"
            )


def _check_postgres(uri: str, timeout_s: float, fix: str) -> None:
    """Connect and log in as MLflow will (``postgresql[+driver]://user:pw@host:port/db``): the server, the
    credentials and the database must all be right. The reason shown never holds the password."""
    import psycopg

    try:
        psycopg.connect("postgresql://" + uri.split("://", 1)[1], connect_timeout=max(2, round(timeout_s))).close()
    except psycopg.Error as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = lines[0] if lines else type(err).__name__
        password = urllib.parse.urlsplit(uri).password
        for secret in {password, urllib.parse.unquote(password or "")} - {None, ""}:
            reason = reason.replace(secret, "***")
        raise ConfigError(
            f"MLflow store {redact(uri)} is unreachable ({redact(reason)}); start the database, fix the URI or {fix}"
        ) from None


def _is_sqlite(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    except OSError:
        return False


def mlflow_client(uri: str) -> MlflowClient:
    """An MlflowClient on ``uri`` (no reachability check: see :func:`client_for`)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def client_for(uri: str) -> MlflowClient:
    """An MlflowClient on ``uri`` after checking it is reachable."""
    check_reachable(uri)
    return mlflow_client(uri)
