"""Reading one image: file or object bytes decoded to uint8 RGB, or straight to two crops; an unreadable one is a
:class:`CorruptImageError` naming it."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mocolab.data import location
from mocolab.data.fastcrop import FastTwoCrop

_SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I")  # PIL's modes of 16-bit greyscale PNG / TIFF files


class CorruptImageError(RuntimeError):
    """An image file that cannot be decoded; the message names the file and ``data.on_corrupt``."""


def _corrupt(where: str | Path, err: Exception) -> CorruptImageError:
    return CorruptImageError(
        f"cannot read image {where}: {err}; replace or remove the file, or set data.on_corrupt=skip "
        "to skip unreadable images (they are counted as corrupt_skipped)"
    )


def decode_rgb(data: bytes, where: str | Path) -> np.ndarray:
    """Decode an encoded image to a uint8 RGB array ``[H, W, 3]`` (greyscale, palette, CMYK and RGBA converted by
    PIL; 16-bit greyscale scaled to 8 bits, where PIL's conversion would clip it to white).

    Raises CorruptImageError naming ``where`` (the file's location) for a truncated or undecodable image. Every
    pipeline decodes other than baseline JPEGs through this function (``data/encoded.py``)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.mode in _SIXTEEN_BIT_GREY:
                grey = (np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
                return np.repeat(grey[:, :, None], 3, axis=2)
            return np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as err:  # PIL's ways of saying "not a readable image"
        raise _corrupt(where, err) from None


def read_encoded(path: str | Path) -> bytes:
    """The bytes of the image file at ``path`` (a local path or an object-store URI); CorruptImageError if missing."""
    try:
        return location.read_bytes(str(path))
    except OSError as err:  # missing, unreadable, or gone from the store since the listing
        raise _corrupt(path, err) from None


def read_rgb(path: str | Path) -> np.ndarray:
    """Read and decode the image at ``path`` (a local path or an object-store URI), as :func:`decode_rgb`.

    Raises CorruptImageError for a missing, truncated or undecodable file."""
    return decode_rgb(read_encoded(path), path)


def two_crops_of_file(transform: Callable, path: str | Path) -> tuple[Any, Any]:
    """The two views of the image file at ``path``: straight from its bytes on the fast path (which decodes a JPEG
    with libjpeg-turbo), else decoded by :func:`decode_rgb` first. CorruptImageError as :func:`read_rgb`."""
    data = read_encoded(path)
    views = transform.from_encoded(data) if isinstance(transform, FastTwoCrop) else None
    return views if views is not None else transform(decode_rgb(data, path))
