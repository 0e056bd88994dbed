"""A read-only, unwritable or full ``scaling.storage_path`` is refused before training, with a clear message."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import namedtuple
from pathlib import Path

import pytest

from mocolab import storage
from mocolab.config import ConfigError
from mocolab.storage import check_storage_path, is_remote


def _mount_tmpfs(target: Path, options: str) -> bool:
    """Mount a small tmpfs at ``target`` (root only); False where mounting is not allowed."""
    target.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return (
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True).returncode
        == 0
    )


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder that cannot be written: a read-only tmpfs as root, a chmod 0555 folder otherwise."""
    target = tmp_path / "readonly"
    if _mount_tmpfs(target, "ro,size=64k"):
        yield target
        subprocess.run(["umount", str(target)], check=True)
    elif os.geteuid() != 0:
        target.chmod(0o555)
        yield target
        target.chmod(0o755)
    else:
        pytest.skip("running as root without permission to mount a read-only tmpfs")


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 64 KiB tmpfs (root only): really full after one checkpoint-sized write."""
    target = tmp_path / "tiny"
    if not _mount_tmpfs(target, "size=64k"):
        pytest.skip("needs root to mount a 64 KiB tmpfs")
    yield target
    subprocess.run(["umount", str(target)], check=True)


def test_local_folder_is_created_and_returned(tmp_path):
    path = str(tmp_path / "a" / "ray_results")
    assert check_storage_path(path, min_free_bytes=1) == path
    assert Path(path).is_dir()
    assert list(Path(path).iterdir()) == []  # the write probe is removed


def test_remote_uris_pass_through_to_ray():
    assert is_remote("s3://bucket/mocolab") and is_remote("gs://bucket/x")
    assert not is_remote("/mnt/nfs/ray_results") and not is_remote("file:///tmp/x")
    assert check_storage_path("s3://my-bucket/mocolab/ray_results") == "s3://my-bucket/mocolab/ray_results"


def test_read_only_storage_path_names_the_field_and_the_fix(read_only_dir):
    with pytest.raises(ConfigError) as err:
        check_storage_path(str(read_only_dir / "ray_results"), min_free_bytes=1)
    message = str(err.value)
    assert f"scaling.storage_path={read_only_dir / 'ray_results'}" in message
    assert "read-only" in message or "not writable" in message
    assert "s3://" in message


def test_storage_path_that_is_a_file_is_refused(tmp_path):
    not_a_folder = tmp_path / "results.txt"
    not_a_folder.write_text("x")
    with pytest.raises(ConfigError, match=r"scaling.storage_path=.*results.txt is not a folder"):
        check_storage_path(str(not_a_folder), min_free_bytes=1)


def test_full_filesystem_is_refused(tiny_filesystem):
    ballast = tiny_filesystem / "ballast"
    with pytest.raises(OSError):
        ballast.write_bytes(b"\0" * (128 * 1024))  # fill it up
    with pytest.raises(ConfigError, match=r"scaling.storage_path=.*tiny is full"):
        check_storage_path(str(tiny_filesystem), min_free_bytes=1)


def test_too_little_free_space_is_refused(tiny_filesystem):
    with pytest.raises(ConfigError, match=r"has only .*KiB free, checkpoints need at least 1.0 GiB"):
        check_storage_path(str(tiny_filesystem))


def test_free_space_threshold_without_root(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda _: usage(10 << 30, (10 << 30) - (5 << 20), 5 << 20))
    with pytest.raises(ConfigError, match=r"has only 5.0 MiB free, checkpoints need at least 1.0 GiB"):
        check_storage_path(str(tmp_path))
