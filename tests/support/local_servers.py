"""Real servers for integration tests, on 127.0.0.1 and free ports, each in its own process session so that
stopping it ends exactly what the test started (never ``ray stop``: it kills every Ray on the machine)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(
    url: str, timeout_s: float, headers: dict[str, str] | None = None, proc: subprocess.Popen | None = None
) -> None:
    """Poll ``url`` until it answers 200; fail at once if ``proc`` (the server) exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server of {url} exited with {proc.returncode} (see its log)")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=3) as resp:
                if resp.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")
        time.sleep(1)


def stop_session(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the process we started, then SIGKILL anything left in its session (its own children)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session=True: the session's group id is proc.pid
    proc.wait(10)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without Ray/MLflow settings inherited from the test session, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_USAGE_STATS_ENABLED="0",
        MLFLOW_DISABLE_TELEMETRY="true",
        NO_ALBUMENTATIONS_UPDATE="1",
        **extra,
    )
    return env


def start_in_session(
    cmd: list[str], cwd: Path, env: dict[str, str], log: Path, user: str | None = None
) -> subprocess.Popen:
    """``cmd`` in its own process session (as ``user`` with that user's group, if given), output to ``log``."""
    as_user = {"user": user, "group": user, "extra_groups": []} if user else {}
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT, **as_user
        )


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with proxied artifacts; ``restart()`` stops it and starts it again on the
    same port and stores. Defaults: a sqlite store and artifacts under ``folder``."""

    def __init__(
        self,
        folder: Path,
        env: dict[str, str] | None = None,
        backend_store_uri: str | None = None,
        artifacts_destination: str | None = None,
    ):
        self.folder, self.env = folder, env or clean_env()
        self.backend_store_uri = backend_store_uri or f"sqlite:///{folder / 'mlflow.db'}"
        self.artifacts_destination = artifacts_destination or str(folder / "mlartifacts")
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None

    def start(self) -> str:
        """Start the server and wait for ``/health`` (~7 s on sqlite on a quiet machine; minutes under load)."""
        self._proc = start_in_session(  # the store by its envvar, as on the cluster's head: no password in `ps`
            [str(VENV_BIN / "mlflow"), "server", "--artifacts-destination", self.artifacts_destination,
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            cwd=self.folder, env={**self.env, "MLFLOW_BACKEND_STORE_URI": self.backend_store_uri},
            log=self.folder / "mlflow.log",
        )  # fmt: skip
        try:
            wait_for_http(f"{self.uri}/health", 300, proc=self._proc)
        except (TimeoutError, RuntimeError):
            self.stop()
            raise
        return self.uri

    def stop(self) -> None:
        if self._proc is not None:
            stop_session(self._proc, 15)
            self._proc = None

    def restart(self) -> str:
        self.stop()
        return self.start()

    def __enter__(self) -> MlflowServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def mlflow_server(folder: Path, env: dict[str, str] | None = None, **stores: str | None) -> Iterator[str]:
    """An :class:`MlflowServer` (``stores``: ``backend_store_uri``, ``artifacts_destination``); yields its URI."""
    with MlflowServer(folder, env, **stores) as server:
        yield server.uri


def postgres_bindir() -> Path:
    """The PostgreSQL server programs (Debian: /usr/lib/postgresql/<version>/bin, named by ``pg_config``)."""
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout
        bindir = Path(out.strip())
        if (bindir / "initdb").exists():
            return bindir
    except (OSError, subprocess.CalledProcessError):
        pass
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not found:
        raise RuntimeError("no PostgreSQL server found: apt-get install postgresql (.ci/run does)")
    return found[-1].parent


@contextlib.contextmanager
def postgres_server(user: str = "mlflow", database: str = "mlflow") -> Iterator[str]:
    """A fresh PostgreSQL on 127.0.0.1 and a free port, in a new folder of the system temp dir that the server's
    user owns (PostgreSQL refuses to run as root: as root it runs as the ``postgres`` system user, who could not
    enter pytest's private temp folders). ``user`` (a password-protected superuser) owns ``database``; yields
    ``postgresql://USER:PASSWORD@127.0.0.1:PORT/DATABASE``; stops with ``pg_ctl stop -m fast`` and removes the
    folder."""
    import psycopg

    bindir, run_as = postgres_bindir(), ("postgres" if os.geteuid() == 0 else None)
    folder = Path(tempfile.mkdtemp(prefix="mocolab-postgres-"))
    data, pwfile, password, port = folder / "data", folder / "pwfile", secrets.token_urlsafe(16), free_port()
    pwfile.write_text(password + "\n")
    if run_as:
        for path in (folder, pwfile):
            shutil.chown(path, run_as, run_as)
    as_user = {"user": run_as, "group": run_as, "extra_groups": []} if run_as else {}
    env = clean_env(LC_ALL="C.UTF-8")
    proc = None
    try:
        subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", user, "--auth=scram-sha-256", f"--pwfile={pwfile}",
             "--encoding=UTF8", "--no-sync"],
            cwd=folder, env=env, check=True, capture_output=True, **as_user,
        )  # fmt: skip
        proc = start_in_session(
            [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-c", "listen_addresses=127.0.0.1",
             "-c", f"unix_socket_directories={folder}", "-c", "fsync=off"],
            cwd=folder, env=env, log=folder / "postgres.log", user=run_as,
        )  # fmt: skip
        server = f"postgresql://{user}:{password}@127.0.0.1:{port}"
        _wait_for_postgres(proc, f"{server}/postgres", folder / "postgres.log")
        with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:  # CREATE DATABASE: no transaction
            conn.execute(f'CREATE DATABASE "{database}"')
        yield f"{server}/{database}"
    finally:
        if proc is not None:
            subprocess.run([str(bindir / "pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w"],
                           cwd=folder, env=env, capture_output=True, **as_user)  # fmt: skip
            stop_session(proc, 15)
        shutil.rmtree(folder, ignore_errors=True)


def _wait_for_postgres(proc: subprocess.Popen, uri: str, log: Path, timeout_s: float = 120) -> None:
    import psycopg

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"postgres exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            psycopg.connect(uri, connect_timeout=3).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"postgres did not accept connections within {timeout_s:.0f} s") from None
            time.sleep(0.3)


@dataclass(frozen=True)
class S3Store:
    """An S3-compatible store: its endpoint, one bucket, and the standard AWS environment that reaches it."""

    endpoint: str
    bucket: str
    env: dict[str, str]

    def client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=self.env["AWS_DEFAULT_REGION"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
        )  # fmt: skip

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` in the bucket."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@contextlib.contextmanager
def s3_server(bucket: str = "mocolab-test") -> Iterator[S3Store]:
    """moto's S3-compatible server (in memory) on 127.0.0.1 and a free port, with ``bucket`` created. Its ``env``
    is the standard AWS environment (``AWS_ENDPOINT_URL``, which boto3, and so MLflow's S3 artifact store and
    pyarrow, read; test credentials; ``us-east-1``)."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "mocolab-test-key-id",
        "AWS_SECRET_ACCESS_KEY": "mocolab-test-secret-key",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with tempfile.TemporaryDirectory(prefix="mocolab-moto-") as folder:
        proc = start_in_session(
            [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            cwd=Path(folder), env=clean_env(), log=Path(folder) / "moto.log",
        )  # fmt: skip
        try:
            wait_for_http(f"{endpoint}/moto-api/", 120, proc=proc)
            store = S3Store(endpoint, bucket, env)
            store.client().create_bucket(Bucket=bucket)
            yield store
        finally:
            stop_session(proc, 10)
