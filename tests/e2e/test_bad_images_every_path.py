"""Unusual and unreadable image files are decoded, refused or skipped (``data.on_corrupt``) the same way by every
path: the CPU loader (``TwoCropDataset``), the stream's CPU task (``stream.TwoCropBatch``), and the device pipeline
fed by the loader (``EncodedDataset``) or by the stream (``stream.ReadBytesBatch``), decoded by ``decode_images``."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mocolab.config import DataConfig
from mocolab.data.augment import two_crop_transform
from mocolab.data.datasets import TwoCropDataset
from mocolab.data.encoded import EncodedDataset, collate_encoded, decode_images, plain_jpeg
from mocolab.data.images import CorruptImageError, decode_rgb
from mocolab.data.sources import FileImages
from mocolab.data.stream import ReadBytesBatch, TwoCropBatch

RGB = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
GREY16 = RGB[..., 0].astype(np.uint16) * 257  # 16-bit greyscale whose top byte is RGB's red channel


def _encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def bad_and_unusual_files(folder) -> dict[str, bool]:
    """Writes the files; {name: readable}."""
    image = Image.fromarray(RGB)
    jpeg = _encode(image, "JPEG")
    files = {
        "rgb.jpg": jpeg,
        "grey.jpg": _encode(image.convert("L"), "JPEG"),
        "cmyk.jpg": _encode(image.convert("CMYK"), "JPEG"),
        "l.png": _encode(image.convert("L"), "PNG"),
        "la.png": _encode(image.convert("LA"), "PNG"),
        "p.png": _encode(image.convert("P"), "PNG"),
        "rgba.png": _encode(image.convert("RGBA"), "PNG"),
        "grey16.png": _encode(Image.fromarray(GREY16), "PNG"),
        "grey16.tif": _encode(Image.fromarray(GREY16), "TIFF"),
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "text.jpg": b"this is not an image",
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: not name.startswith(("truncated", "text")) for name in files}


def _outcome(run) -> str:
    try:
        run()
        return "ok"
    except CorruptImageError as err:
        return str(err)


@pytest.fixture
def files(tmp_path):
    readable = bad_and_unusual_files(tmp_path)
    return tmp_path, readable


def test_sixteen_bit_grey_is_scaled_not_clipped(files):
    folder, _ = files
    for name in ("grey16.png", "grey16.tif"):
        decoded = decode_rgb((folder / name).read_bytes(), name)
        assert decoded.dtype == np.uint8 and np.array_equal(decoded[..., 1], RGB[..., 0]), name


def test_jpeg_decoders_agree_with_pil(files):
    folder, _ = files
    payloads = [
        torch.frombuffer(bytearray((folder / n).read_bytes()), dtype=torch.uint8) for n in ("rgb.jpg", "grey.jpg")
    ]
    assert all(plain_jpeg(p.numpy().tobytes()) for p in payloads)
    assert not plain_jpeg((folder / "cmyk.jpg").read_bytes()) and not plain_jpeg(
        (folder / "truncated.jpg").read_bytes()
    )
    images, skipped = decode_images(payloads, ["rgb.jpg", "grey.jpg"], torch.device("cpu"), "fail")
    for image, name in zip(images, ("rgb.jpg", "grey.jpg")):
        assert torch.equal(
            image.permute(1, 2, 0), torch.from_numpy(decode_rgb((folder / name).read_bytes(), name).copy())
        )
    assert skipped == 0


@pytest.mark.parametrize("on_corrupt", ["fail", "skip"])
def test_every_path_treats_each_file_the_same(files, on_corrupt):
    folder, readable = files
    data_cfg = DataConfig(dataset="folder", root=str(folder), image_size=16, augment="moco_v2", on_corrupt=on_corrupt)
    cpu = torch.device("cpu")
    for name, ok in readable.items():
        where = str(folder / name)
        source = FileImages([where, str(folder / "rgb.jpg")], np.zeros(2, dtype=np.int64))
        rows = {"location": np.array([where, str(folder / "rgb.jpg")], dtype=object), "index": np.arange(2)}

        def loader_device():
            batch = collate_encoded([item for item in (EncodedDataset(source, on_corrupt)[i] for i in range(2))])
            return decode_images(batch.payloads, batch.locations, cpu, on_corrupt)

        def stream_device():
            out = ReadBytesBatch(data_cfg)(rows)
            payloads = [torch.frombuffer(bytearray(p), dtype=torch.uint8) for p in out["payload"]]
            return decode_images(payloads, list(out["location"]), cpu, on_corrupt)

        outcomes = {
            "loader cpu": _outcome(lambda: TwoCropDataset(source, two_crop_transform("moco_v2", 16), on_corrupt)[0]),
            "stream cpu": _outcome(lambda: TwoCropBatch(data_cfg)(rows)),
            "loader device": _outcome(loader_device),
            "stream device": _outcome(stream_device),
        }
        expected = "ok" if ok or on_corrupt == "skip" else f"cannot read image {where}: "
        assert all(o.startswith(expected) for o in outcomes.values()), (name, outcomes)
        if on_corrupt == "skip":
            skipped = {
                "loader cpu": int(TwoCropDataset(source, two_crop_transform("moco_v2", 16), on_corrupt)[0] is None),
                "stream cpu": int(TwoCropBatch(data_cfg)(rows)["skipped"].sum()),
                "loader device": loader_device()[1],
                "stream device": stream_device()[1],
            }
            assert set(skipped.values()) == {0 if ok else 1}, (name, skipped)


def test_a_worker_error_reaches_the_console_as_the_drivers_one_line_only():
    """Ray Train's ``Error in training function:`` traceback stays off a quiet worker's console (the driver prints
    the error's last line, naming the file; the log files keep the traceback); other warnings still show."""
    import logging

    from mocolab.runtime import TRAINING_FUNCTION_ERROR, _no_training_function_traceback

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("ray.train.v2._internal.util", logging.ERROR, __file__, 1, message, None, None)

    assert not _no_training_function_traceback(record(f"{TRAINING_FUNCTION_ERROR}:\nTraceback ...CorruptImageError"))
    assert _no_training_function_traceback(record("data.on_corrupt=skip, skipped: cannot read image /x/a.jpg"))
