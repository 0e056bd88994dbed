"""Which checkpoint a resumed run loads, when the latest one cannot be loaded.

Ray Train V2 keeps the last ``train.keep_checkpoints`` checkpoints of a run, each a folder
``<scaling.storage_path>/<run name>/checkpoint_<timestamp>/`` (holding ``checkpoint.pt``), listed with the
metrics reported with them in ``checkpoint_manager_snapshot.json`` beside them; a restarted or relaunched
run gets the latest from ``ray.train.get_checkpoint()`` and the list from
``ray.train.get_all_reported_checkpoints()``. If the latest cannot be loaded (truncated by a full disk or
a half-finished copy to shared storage), rank 0 tries the others, newest epoch first, and every rank loads
the first that does; if none does, :class:`NoLoadableCheckpointError` names them all and the fix.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, TypeVar

import torch

from mocolab.train.checkpoint import CHECKPOINT_FILE, load_checkpoint

T = TypeVar("T")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class NoLoadableCheckpointError(RuntimeError):
    """None of a run's checkpoints can be loaded: resuming it is impossible; the message says what to do."""


@dataclass
class Resumed:
    """The state a run resumes from, where it came from, and the newer checkpoints that could not be loaded."""

    state: dict[str, Any]
    path: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (checkpoint file, why it did not load)

    def fallback_note(self) -> str | None:
        """One line naming the unloadable files and the epoch the run resumes from; None without a fallback."""
        if not self.skipped:
            return None
        bad = "; ".join(f"{path} ({reason})" for path, reason in self.skipped)
        return f"could not load {bad}; resumed from epoch {self.state['epoch']} ({self.path})"


def resume_order(latest: str, reported: Sequence[tuple[str, int | None]]) -> list[str]:
    """The checkpoint paths to try, in order: ``latest`` (the one Ray hands back), then the other
    ``reported`` ones (``(path, epoch reported with it)`` in report order) newest epoch first, the later
    report first among equal epochs, those without an epoch last."""
    ranked = sorted(
        ((epoch if epoch is not None else -1, index, path) for index, (path, epoch) in enumerate(reported)),
        reverse=True,
    )
    return [latest] + [path for _, _, path in ranked if path != latest]


def first_loadable(
    candidates: Sequence[T], load: Callable[[T], dict[str, Any]], name: Callable[[T], str]
) -> tuple[T, dict[str, Any], list[tuple[str, str]]]:
    """Load ``candidates`` in order until one loads; returns it, its state and ``(name, reason)`` of those
    that failed before it. Raises :class:`NoLoadableCheckpointError` listing every failure if none loads."""
    failures: list[tuple[str, str]] = []
    for candidate in candidates:
        try:
            return candidate, load(candidate), failures
        except Exception as err:  # any failure to read or unpickle makes the file unusable; it is named below
            failures.append((name(candidate), _reason(err)))
    raise NoLoadableCheckpointError(no_loadable_message(failures))


def no_loadable_message(failures: Sequence[tuple[str, str]]) -> str:
    """The error of a run none of whose checkpoints loads: each file with its reason, then the fix."""
    listed = "\n".join(f"  {path}: {reason}" for path, reason in failures)
    return (
        f"none of this run's {len(failures)} checkpoint(s) can be loaded, newest first:\n{listed}\n"
        "Start a new run (--set tracking.run_name=<new name>), or put back a good copy of one of these files "
        "and launch this run again."
    )


def _reason(err: Exception) -> str:
    """A one-line reason: torch's weights-only refusal as such, else the error's first sentence."""
    text = _ANSI.sub("", str(err))
    if isinstance(err, pickle.UnpicklingError) and "WeightsUnpickler error:" in text:
        detail = _first_sentence(text.split("WeightsUnpickler error:", 1)[1])
        return f"refused by torch.load(weights_only=True): {detail}"
    first = _first_sentence(text)
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _first_sentence(text: str) -> str:
    text = text.strip()
    return text.split(". ", 1)[0].splitlines()[0].rstrip(".") if text else ""


def _file_of(checkpoint) -> str:
    return str(PurePosixPath(checkpoint.path) / CHECKPOINT_FILE)


def _load(checkpoint, map_location) -> dict[str, Any]:
    with checkpoint.as_directory() as directory:
        return load_checkpoint(directory, map_location=map_location)


def _choose(checkpoint, map_location):
    """Rank 0: the first loadable of the run's registered checkpoints, Ray's latest first;
    returns ``(checkpoint, state, skipped)`` as :func:`first_loadable` does."""
    import ray.train

    reported = ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    by_path = {checkpoint.path: checkpoint, **{r.checkpoint.path: r.checkpoint for r in reported}}
    order = resume_order(checkpoint.path, [(r.checkpoint.path, r.metrics.get("epoch")) for r in reported])
    return first_loadable([by_path[path] for path in order], lambda c: _load(c, map_location), _file_of)


def load_for_resume(checkpoint, rank: int, world_size: int, map_location: torch.device) -> Resumed:
    """The state every rank resumes from (a collective: all ranks call it with Ray's ``get_checkpoint()``).

    Rank 0 chooses and broadcasts its choice, so that all ranks load the same checkpoint; if none loads,
    every rank raises the same :class:`NoLoadableCheckpointError`."""
    choice: list[Any] = [None, None, None]  # chosen checkpoint, skipped files, error message
    state: dict[str, Any] | None = None
    if rank == 0:
        try:
            choice[0], state, choice[1] = _choose(checkpoint, map_location)
        except NoLoadableCheckpointError as err:
            choice[2] = str(err)
    if world_size > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(choice, src=0)
    chosen, skipped, error = choice
    if error is not None:
        raise NoLoadableCheckpointError(error)
    if state is None:  # ranks other than 0
        state = _load(chosen, map_location)
    return Resumed(state, chosen.path, skipped)
