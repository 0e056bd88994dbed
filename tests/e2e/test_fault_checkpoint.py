"""A process killed (SIGKILL: no exception handler, no cleanup) in the middle of writing a checkpoint leaves
the previous checkpoint intact and loadable. (tests/train/test_checkpoint.py covers a save that raises.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch

from mocolab.train.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint

_WRITER = """
import sys, time
from pathlib import Path
import torch
from mocolab.train.checkpoint import save_checkpoint

directory, marker = Path(sys.argv[1]), Path(sys.argv[2])
real_save = torch.save

def save_then_hang(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)  # the bytes are in the temporary file, not yet renamed
    f.flush()
    marker.touch()
    time.sleep(600)

torch.save = save_then_hang
save_checkpoint(directory, {"model": {"queue": torch.full((64, 8), 2.0)}, "epoch": 2})
"""


def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, {"model": {"queue": torch.full((64, 8), 1.0)}, "epoch": 1})
    marker = tmp_path.parent / f"{tmp_path.name}-writing"
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), str(marker)])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert writer.poll() is None, "the writer exited before it was killed"
            assert time.monotonic() < deadline, "the writer never reached the middle of its save"
            time.sleep(0.05)
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait()

    leftovers = [p.name for p in tmp_path.iterdir() if p.name != CHECKPOINT_FILE]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")  # the interrupted write, never renamed
    state = load_checkpoint(tmp_path)
    assert state["epoch"] == 1
    assert torch.equal(state["model"]["queue"], torch.full((64, 8), 1.0))
    save_checkpoint(tmp_path, {"model": {"queue": torch.full((64, 8), 3.0)}, "epoch": 3})  # the next save works
    assert load_checkpoint(tmp_path)["epoch"] == 3
