"""Real servers for integration tests, on 127.0.0.1 and free ports, each in its own process session so that
stopping it ends exactly what the test started (never ``ray stop``: it kills every Ray on the machine)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout_s: float, headers: dict[str, str] | None = None) -> None:
    """Poll ``url`` until it answers 200."""
    deadline = time.monotonic() + timeout_s
    while True:
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


def start_in_session(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)


@contextlib.contextmanager
def mlflow_server(folder: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 with a sqlite store and proxied artifacts under ``folder``; yields its URI."""
    port = free_port()
    proc = start_in_session(
        [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "mlartifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=folder, env=env or clean_env(), log=folder / "mlflow.log",
    )  # fmt: skip
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_for_http(f"{uri}/health", 300)  # ~7 s on a quiet machine; minutes under heavy load
        yield uri
    finally:
        stop_session(proc, 15)
