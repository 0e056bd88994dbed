"""Who made a run: MLflow's source tags (command line, git commit, user) and the driver process of a pretraining
run (``DRIVER_TAG``), so that a run left RUNNING by a driver that is gone can be told from one still driven."""

from __future__ import annotations

import getpass
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from mocolab.tracking.masking import redact
from mocolab.tracking.names import (
    COMMAND_TAG,
    GIT_COMMIT_TAG,
    SOURCE_GIT_COMMIT_TAG,
    SOURCE_NAME_TAG,
    SOURCE_TYPE_TAG,
    USER_TAG,
)


def git_commit() -> str | None:
    """The commit of the checkout mocolab runs from, if it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def command_line() -> str:
    """The mocolab command this process runs (``mocolab pretrain experiments/x.yaml --set ...``), credentials
    removed; plain ``mocolab`` in a process that is not the command line (a Ray worker, a notebook)."""
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    if program.name != "mocolab" and program.parts[-2:] != ("mocolab", "cli.py"):
        return "mocolab"
    return redact(shlex.join(["mocolab", *sys.argv[1:]]))


def source_tags() -> dict[str, str]:
    """MLflow's source tags of a run this process creates: ``mocolab <subcommand>`` (the UI's Source column shows
    the part after the last '/', so not the whole command line, which goes to ``mocolab.command``), the git
    commit, the user."""
    command = command_line()
    tags = {SOURCE_NAME_TAG: " ".join(shlex.split(command)[:2]), SOURCE_TYPE_TAG: "LOCAL", COMMAND_TAG: command}
    commit = git_commit()
    if commit:
        tags[GIT_COMMIT_TAG] = tags[SOURCE_GIT_COMMIT_TAG] = commit
    try:
        tags[USER_TAG] = getpass.getuser()
    except (KeyError, OSError):  # no login name (some containers)
        pass
    return tags


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (Linux: clock ticks after boot, from /proc), or None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22 of proc(5); fields after "(comm)" start at 3


def driver_id() -> str:
    """This process as the driver of a run: ``host:pid:start`` (the start tells a reused pid apart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{process_start(os.getpid()) or '?'}"


DRIVER_ALIVE, DRIVER_GONE, DRIVER_SELF, DRIVER_UNKNOWN = "alive", "gone", "self", "unknown"


def driver_state(tag: str | None, host: str, own_pid: int, process_start: Callable[[int], str | None]) -> str:
    """Whether the driver recorded in a run's ``DRIVER_TAG`` still runs: ``DRIVER_SELF`` (this process),
    ``DRIVER_ALIVE``, ``DRIVER_GONE`` (no process with that pid and start time on this host), or
    ``DRIVER_UNKNOWN`` (no tag, another host, or no /proc to look in). Pure: ``process_start`` looks."""
    parts = (tag or "").rsplit(":", 2)
    if len(parts) != 3 or parts[0] != host or not parts[1].isdigit() or parts[2] == "?":
        return DRIVER_UNKNOWN
    pid, started = int(parts[1]), parts[2]
    if process_start(pid) != started:
        return DRIVER_GONE
    return DRIVER_SELF if pid == own_pid else DRIVER_ALIVE
