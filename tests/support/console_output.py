"""Reading a command's console output as a terminal shows it (for the quiet-console tests)."""

from __future__ import annotations

import re

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
RAY_CHATTER = (
    "PlacementGroupCleaner",
    "PreemptionWatcher",
    "TrainingReport(",
    "training worker group",
    "Setting up process group",
    "Wrapping provided model",
    "Moving model to device",
    "Started a local Ray instance",
    "Connecting to existing Ray cluster",
    "Creating initial MLflow database",
)
"""Lines of Ray's (and MLflow's) internals that the default console must not show (issue 12)."""
RAY_WORKER_LINE = re.compile(r"^(?:\x1b\[[0-9;]*m)?\((?:\w+ )?pid=\d+(?:, ip=[\d.]+)?\)")
"""The prefix of a line Ray streams from a worker to its driver, ``(RayTrainWorker pid=123) ...``."""


def without_ray_worker_lines(text: str) -> str:
    """``text`` without the lines streamed from Ray workers."""
    return "".join(line for line in text.splitlines(keepends=True) if not RAY_WORKER_LINE.search(line))


def screen_lines(output: str) -> list[str]:
    """The lines a terminal ends up showing: each line's text after its last carriage return (a progress bar
    redraws itself with \\r), without colour codes and surrounding spaces, empty ones left out."""
    lines = (ANSI.sub("", line.split("\r")[-1]).strip() for line in output.replace("\r\n", "\n").split("\n"))
    return [line for line in lines if line]


def progress_lines(output: str) -> list[str]:
    """mocolab's progress lines: its ``[mocolab ...]`` messages and the finished progress bars."""
    return [line for line in screen_lines(output) if line.startswith("[mocolab") or "img/s:" in line]


def chatter(output: str) -> list[str]:
    """The lines of ``output`` that show Ray's internals (see RAY_CHATTER)."""
    return [line for line in screen_lines(output) if any(marker in line for marker in RAY_CHATTER)]


def run_in_terminal(cmd: list[str], cwd, env: dict[str, str], timeout_s: float) -> tuple[int, str]:
    """Run ``cmd`` with a pseudo-terminal as its stdin, stdout and stderr (what a user's shell gives it);
    returns its exit code and everything it wrote."""
    import fcntl
    import os
    import pty
    import select
    import struct
    import subprocess
    import termios
    import time

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))  # 200 columns: room for the bars
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1.0)[0]:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the command closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
    finally:
        os.close(master)
    return proc.wait(30), b"".join(chunks).decode(errors="replace")
