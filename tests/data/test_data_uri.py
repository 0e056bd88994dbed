"""Datasets and the pre-flight step over an object store (the session's moto S3 server on 127.0.0.1): the same images,
labels and digests as the local folder they were uploaded from, one listing per process, corrupt images named by
their URI, and one-line refusals of a missing prefix, a missing split and an unreachable store."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mocolab.config import ConfigError, build_config
from mocolab.data import datasets, images, location, sources
from mocolab.data.images import CorruptImageError
from mocolab.data.sources import image_source, num_classes, summarize
from mocolab.preflight import preflight

BUCKET = "mocolab-test"  # the session store's bucket (conftest ``s3``)


def make_imagefolder(root, per_class=3):
    for split in ("train", "test"):
        for c, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = np.full((12, 10, 3), 40 * c + 7 * i, dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")


def upload(s3, folder: Path, prefix: str) -> None:
    """Every file under ``folder`` to ``s3://BUCKET/<prefix>/<its path under folder>``."""
    client = s3.client()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.upload_file(str(path), s3.bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


@pytest.fixture(scope="module")
def store(s3, tmp_path_factory):
    """A local image folder, uploaded to ``s3://BUCKET/sets/pets``, with this process's AWS environment pointing at
    the store (filesystems opened before read the old environment: the cache is cleared both ways)."""
    assert s3.bucket == BUCKET
    local = tmp_path_factory.mktemp("imagefolder")
    make_imagefolder(local)
    upload(s3, local, "sets/pets")
    with pytest.MonkeyPatch.context() as env:
        for key, value in s3.env.items():
            env.setenv(key, value)
        location._store.cache_clear()
        yield local
    location._store.cache_clear()


def _section(root, **extra):
    return {"dataset": "imagefolder", "root": str(root), "limit_train": None, **extra}


def _cfg(tmp_path, data):
    return build_config(
        {
            "data": data,
            "model": {"arch": "small_cnn", "bn": "plain"},
            "moco": {"queue_size": 8},
            "train": {"batch_size": 2, "knn_every": 0},
            "scaling": {"num_workers": 1, "storage_path": str(tmp_path)},
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        }
    )


def test_imagefolder_from_a_uri_matches_the_local_folder(store, tmp_path, monkeypatch):
    uri = f"s3://{BUCKET}/sets/pets"
    sources.object_images.cache_clear()
    listings = []
    real = location.list_files
    monkeypatch.setattr(location, "list_files", lambda where: listings.append(where) or real(where))
    local_cfg, uri_cfg = _cfg(tmp_path, _section(store)), _cfg(tmp_path, _section(uri))
    for split in ("train", "test"):
        here, there = image_source(local_cfg.data, split), image_source(uri_cfg.data, split)
        assert [p.removeprefix(uri) for p in there.paths] == [p.removeprefix(str(store)) for p in here.paths]
        assert there.paths[0].startswith(f"{uri}/{split}/cat/")
        np.testing.assert_array_equal(there.labels, here.labels)
        np.testing.assert_array_equal(there.read(4), here.read(4))
    assert num_classes(uri_cfg.data) == 2
    assert summarize(uri_cfg.data).digest == summarize(local_cfg.data).digest
    assert summarize(uri_cfg.data).name == "pets/train"
    assert listings == [uri]  # one listing per process serves every split, the classes and the summary
    view_q, view_k, index = datasets.build_pretrain_dataset(uri_cfg.data)[3]
    assert view_q.shape == view_k.shape == (3, 32, 32) and index == 3


def test_folder_dataset_from_a_uri(store, tmp_path):
    cfg = _cfg(tmp_path, {"dataset": "folder", "root": f"s3://{BUCKET}/sets/pets/train"})
    source = image_source(cfg.data, "train")
    assert len(source) == 6 and not any(p.endswith(".txt") for p in source.paths)


def test_a_corrupt_object_is_named_by_its_uri(store, s3, tmp_path):
    upload_dir = tmp_path / "bad"
    (upload_dir / "x").mkdir(parents=True)
    (upload_dir / "x" / "broken.png").write_bytes(b"\x89PNG not really")
    upload(s3, upload_dir, "corrupt")
    uri = f"s3://{BUCKET}/corrupt/x/broken.png"
    with pytest.raises(CorruptImageError, match=rf"cannot read image {uri}: .*data.on_corrupt=skip"):
        images.read_rgb(uri)
    with pytest.raises(CorruptImageError, match=rf"cannot read image s3://{BUCKET}/corrupt/x/gone.png"):
        images.read_rgb(f"s3://{BUCKET}/corrupt/x/gone.png")
    skip = _cfg(tmp_path, {"dataset": "folder", "root": f"s3://{BUCKET}/corrupt", "on_corrupt": "skip"})
    assert datasets.build_pretrain_dataset(skip.data)[0] is None


def test_preflight_counts_a_uri_root_with_the_object_listing(store, tmp_path):
    report = preflight(_cfg(tmp_path, _section(f"s3://{BUCKET}/sets/pets")), quiet=True)
    assert list(report.train_images.values()) == [6] and list(report.test_images.values()) == [6]


def test_preflight_refuses_an_empty_prefix_and_a_missing_split(store, tmp_path):
    with pytest.raises(ConfigError) as err:
        preflight(_cfg(tmp_path, _section(f"s3://{BUCKET}/sets/no-such")), quiet=True)
    assert str(err.value) == (
        f"data.root=s3://{BUCKET}/sets/no-such: no images under it; upload the dataset there "
        f"(e.g. aws s3 sync DIR s3://{BUCKET}/sets/no-such) or fix the prefix"
    )
    with pytest.raises(
        ConfigError,
        match=r"data.test_split=val under data.root=s3://.*/pets: no class folders with "
        r"images under s3://.*/pets/val; upload the split or fix it",
    ):
        preflight(_cfg(tmp_path, _section(f"s3://{BUCKET}/sets/pets", test_split="val")), quiet=True)


def test_preflight_refuses_an_unreachable_store_naming_the_variables_not_their_values(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSECRETVALUE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    location._store.cache_clear()
    sources.object_images.cache_clear()
    try:
        with pytest.raises(ConfigError) as err:
            preflight(_cfg(tmp_path, _section("s3://mocolab-test/sets/pets")), quiet=True)
    finally:
        location._store.cache_clear()
    message = str(err.value)
    assert message.startswith("data.root=s3://mocolab-test/sets/pets: cannot list the object store (")
    assert "set AWS_ENDPOINT_URL" in message and "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in message
    assert "SECRET" not in message.replace("AWS_SECRET_ACCESS_KEY", "") and "very-secret" not in message
