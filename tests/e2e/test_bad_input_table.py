"""The table of refused bad input in docs/bad_input.md, run row by row through the real CLI (in process).

Each row's command runs in a fresh folder holding the files the rows name; the test checks what the table promises:
exit 2, every `quoted` part of the message on stderr, no traceback, no secret, no MLflow run created, no Ray started,
nothing written under the storage path. The table is the case list, so it cannot drift from what the code does.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from mocolab import cli

REPO = Path(__file__).resolve().parents[2]
TABLE_TITLE = "# Bad input the project refuses"
PLACEHOLDERS = {
    "quickstart": str(REPO / "experiments" / "pretrain" / "quickstart.yaml"),
    "evals": str(REPO / "experiments" / "eval" / "quickstart.yaml"),
}


@dataclass(frozen=True)
class Row:
    number: int
    what: str
    command: str
    fragments: tuple[str, ...]


def table_rows(text: str) -> list[Row]:
    """The rows of the table under TABLE_TITLE: number, input, command (backquoted), message fragments."""
    section = text[text.index(TABLE_TITLE) :]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].isdigit():
            command = re.fullmatch(r"`(.+)`", cells[3])
            assert command, f"row {cells[0]}: the command must be one `quoted` command line"
            rows.append(Row(int(cells[0]), cells[1], command.group(1), tuple(re.findall(r"`([^`]+)`", cells[4]))))
    return rows


ROWS = table_rows((REPO / "docs" / "bad_input.md").read_text())


def test_the_table_has_at_least_40_distinct_cases():
    assert len(ROWS) >= 40
    assert [row.number for row in ROWS] == list(range(1, len(ROWS) + 1))
    assert len({row.command for row in ROWS}) == len(ROWS)
    assert all(row.fragments for row in ROWS)


def test_an_earlier_tests_ray_worker_lines_are_not_the_commands_output(command_output):
    """What the session's Ray streamed late (the CI run that failed row 1) is dropped; the command's lines stay."""
    print("\x1b[36m(RayTrainWorker pid=24716)\x1b[0m Traceback (most recent call last):", file=sys.stderr)
    print('(_WrappedExecutor pid=81, ip=10.0.0.2)   File "pretrain.py", line 309', file=sys.stderr)
    print("mocolab pretrain: the config file (pid=3) is missing", file=sys.stderr)
    assert command_output().err == "mocolab pretrain: the config file (pid=3) is missing\n"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_files(folder: Path, quickstart: str) -> None:
    """The files and folders the rows name."""
    (folder / "a-yaml-list.yaml").write_text("- moco\n- model\n")
    (folder / "latin1.yaml").write_bytes("moco:\n  dim: 128  # caf\u00e9\n".encode("latin-1"))
    (folder / "broken.yaml").write_text("moco: {dim: [128\n")
    (folder / "a-folder").mkdir()
    (folder / "a-file").write_text("a file, not a folder\n")
    (folder / "empty-dir").mkdir()
    (folder / "not-a-db.db").write_text("not a database\n")
    (folder / "not-weights.pt").write_text("hello\n")
    import torch

    torch.save({"conv1.weight": torch.zeros(1, 3, 1, 1)}, folder / "a-resnet.pth")
    for split in ("train", "test"):
        (folder / "empty-classes" / split).mkdir(parents=True)
    from PIL import Image

    for split in ("train", "test"):
        (folder / "link-loop" / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folder / "link-loop" / split / "cat" / "0.png")
    (folder / "link-loop" / "train" / "cat" / "again").symlink_to("..", target_is_directory=True)
    (folder / "sweep-missing-base.yaml").write_text(
        "name: missing-base\nbase: no-such-base.yaml\nspace: {moco.temperature: {grid: [0.1]}}\n"
    )
    (folder / "sweep-too-wide.yaml").write_text(
        f"name: too-wide\nbase: {quickstart}\nspace: {{moco.temperature: {{grid: [0.1, 0.2, 0.3]}}}}\n"
        "resources: {workers: 2, cpus_per_worker: 1}\nmax_concurrent_trials: 3\n"
    )


def make_runs(uri: str) -> dict[str, str]:
    """An MLflow store with a KILLED pretraining run without artifacts and a RUNNING run 'busy' whose driver (this
    test's parent process) is alive. Returns the placeholder for the stored run's id."""
    from mlflow import MlflowClient

    from mocolab import tracking

    client = MlflowClient(uri)
    experiment = tracking.experiment_id(client, "quickstart")
    stored = client.create_run(experiment, run_name="stored", tags={tracking.STAGE_TAG: tracking.STAGE_PRETRAIN})
    client.set_terminated(stored.info.run_id, "KILLED")
    parent = os.getppid()
    driver = f"{socket.gethostname()}:{parent}:{tracking.process_start(parent)}"
    client.create_run(experiment, run_name="busy", tags={tracking.STAGE_TAG: tracking.STAGE_PRETRAIN,
                                                         tracking.DRIVER_TAG: driver})  # fmt: skip
    return {"stored_run": stored.info.run_id}


def run_count(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db) as con:
        return con.execute("SELECT count(*) FROM runs").fetchone()[0]


@pytest.mark.parametrize("row", ROWS, ids=lambda row: f"{row.number}-{row.what}")
def test_bad_input_is_refused_before_compute(row, tmp_path, monkeypatch, command_output):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    make_files(tmp_path, PLACEHOLDERS["quickstart"])
    values = {**PLACEHOLDERS, "closed_port": str(closed_port())}
    if "{stored_run}" in row.command or "run_name=busy" in row.command:
        values.update(make_runs(f"sqlite:///{db}"))
    command = re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), row.command)
    words = shlex.split(command)
    while "=" in words[0]:  # leading NAME=VALUE: the command's environment
        name, _, value = words.pop(0).partition("=")
        monkeypatch.setenv(name, value)
    assert words[0] == "mocolab", row.command
    runs_before = run_count(db)
    ray_starts: list[tuple] = []
    monkeypatch.setattr("ray.init", lambda *a, **k: ray_starts.append(a) or pytest.fail("Ray was started"))
    command_output()

    code = cli.main(words[1:])
    out, err = command_output()

    assert code == 2, f"exit {code}\n{out}\n{err}"
    for fragment in row.fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert any(line.startswith(f"mocolab {words[1]}: ") for line in err.splitlines()), err
    assert "Traceback" not in out + err
    assert "secret" not in out + err  # the password of rows 40 and 60
    assert run_count(db) == runs_before, "an MLflow run was created"
    assert not ray_starts, "Ray was started"
    assert not any((tmp_path / "ray_results").glob("*/*")), "something was written under the storage path"
