"""A real multi-node Ray cluster on this machine, for tests that lose a whole node.

Every node is ``ray start --block`` in its own process session: all the processes of a node (its raylet,
agents, log monitor and the workers its raylet starts, which Ray puts in process groups of their own) share
that session, so SIGKILL to every process of the session is the node vanishing at once, and stopping the
cluster ends exactly what the test started. Each
node has a temp dir of its own, as on separate machines (short: Ray's unix sockets must stay under ~107 characters;
one shared dir let a new node's agents remove files of a live job's working dir, and every node's log monitor stream
every worker's lines), under one cluster folder; the nodes use free ports and the cluster's own auth token, so other
Ray instances on the machine (the suite's ``ray_local``, other users') are never
touched; never ``ray stop``, which ends every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import psutil
from local_servers import VENV_BIN, clean_env, free_port, start_in_session

NODE_PORTS = (
    "node-manager-port",
    "object-manager-port",
    "runtime-env-agent-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
)
HEAD_PORTS = NODE_PORTS + ("ray-client-server-port",)
JOB_SLOT = "node_slot"
"""The custom resource of the session's job cluster (conftest ``job_cluster``): one per worker node, so a run's
workers asking for one each land one per node."""


class LocalCluster:
    """Nodes started with :meth:`add_node` (the first is the head); ``env`` lets a driver connect and is every
    node's environment (``node_env`` adds to it, as a cluster's nodes export settings before ``ray start``).
    With ``dashboard``, the head runs the dashboard and job server on 127.0.0.1 (``dashboard_url``)."""

    def __init__(self, folder: Path, node_env: dict[str, str] | None = None, dashboard: bool = False):
        self.folder = folder
        self.token = folder / "auth_token"
        self.token.write_text(secrets.token_hex(32))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token), **(node_env or {}))
        self.dashboard_port = free_port() if dashboard else None
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}" if dashboard else None
        self.nodes: list[subprocess.Popen] = []  # every `ray start` this cluster ran, the failed ones too
        self.head: subprocess.Popen | None = None

    def add_node(
        self, num_cpus: int, resources: dict[str, float], attempts: int = 3, wrap: Sequence[str] = ()
    ) -> subprocess.Popen:
        """Start a node (the head if it is the first) and wait until it runs; ``wrap`` is a command that runs
        ``ray start`` (its arguments follow), e.g. one that gives the node a filesystem view of its own. On a loaded
        machine a node can miss Ray's fixed 30 s registration deadline ("timed out during startup"): it is then
        stopped and started again, up to ``attempts`` times."""
        for _ in range(attempts):
            node, log = self._start_node(num_cpus, resources, wrap)
            if self._started(node, log, timeout_s=120):
                self.head = self.head or node
                return node
            self.kill_node(node)
        last_log = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"a Ray node did not start {attempts} times; the last log:\n{last_log}")

    def _start_node(
        self, num_cpus: int, resources: dict[str, float], wrap: Sequence[str]
    ) -> tuple[subprocess.Popen, Path]:
        head = self.head is None
        if not head:
            role = [f"--address={self.address}"]
        elif self.dashboard_port is None:
            role = ["--head", f"--port={self.port}", "--include-dashboard=false"]
        else:
            role = ["--head", f"--port={self.port}", f"--dashboard-port={self.dashboard_port}",
                    "--dashboard-host=127.0.0.1"]  # fmt: skip
        temp_dir = self.folder / f"ray{len(self.nodes)}"
        cmd = [*wrap, str(VENV_BIN / "ray"), "start", "--block", *role, f"--num-cpus={num_cpus}",
               f"--resources={json.dumps(resources)}", "--disable-usage-stats", f"--temp-dir={temp_dir}",
               *(f"--{name}={free_port()}" for name in (HEAD_PORTS if head else NODE_PORTS))]  # fmt: skip
        log = self.folder / f"node{len(self.nodes)}.log"
        node = start_in_session(cmd, cwd=self.folder, env=self.env, log=log)
        self.nodes.append(node)
        return node, log

    @staticmethod
    def _started(node: subprocess.Popen, log: Path, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if node.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        return True

    def processes(self, node: subprocess.Popen) -> list[psutil.Process]:
        """Every live process of ``node`` (of its session)."""
        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if os.getsid(proc.pid) == node.pid and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
        return found

    def kill_node(self, node: subprocess.Popen) -> list[psutil.Process]:
        """SIGKILL every process of ``node`` (a lost machine); returns what was killed."""
        victims = self.processes(node)
        for proc in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGKILL)
        node.wait(10)
        psutil.wait_procs(victims, timeout=10)
        return victims

    def shutdown(self) -> None:
        """SIGKILL every process of every node, then any process left that names this cluster's temp dir."""
        for node in self.nodes:
            self.kill_node(node)
        leftovers = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if str(self.folder) in " ".join(proc.cmdline()):
                    proc.kill()
                    leftovers.append(proc)
        psutil.wait_procs(leftovers, timeout=10)


@contextlib.contextmanager
def local_cluster(node_env: dict[str, str] | None = None, dashboard: bool = False) -> Iterator[LocalCluster]:
    """A :class:`LocalCluster` in a fresh temp dir, always shut down and removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="mocolab-cluster-", dir="/tmp"))
    cluster = LocalCluster(folder, node_env, dashboard)
    try:
        yield cluster
    finally:
        cluster.shutdown()
        for log in sorted(folder.glob("*.log")):
            print(f"--- {log.name} (tail) ---\n{log.read_text(errors='replace')[-2000:]}")
        shutil.rmtree(folder, ignore_errors=True)
