"""``data.pipeline=device``: the CPU reads bytes, the worker's device decodes and two-crops them.

CPU side (DataLoader workers or Ray Data tasks): :class:`EncodedDataset` yields each training image as a 1-D uint8
tensor of its file's bytes (image files) or as its ``[H, W, 3]`` uint8 pixels (in-memory datasets: digits,
CIFAR-10), and :func:`collate_encoded` makes an :class:`EncodedBatch` of them (a list: sizes differ).

Device side: :func:`decode_images` decodes a batch's files on ``device``: baseline/progressive 8-bit JPEGs with one or
three components that end in their EOI marker go to torchvision's batched ``decode_jpeg`` (``device="cuda"`` on a
GPU: nvJPEG); every other file (PNG, CMYK JPEG, 16-bit, palette, truncated, not an image...) goes through
:func:`mocolab.data.images.decode_rgb`, the CPU loader's own PIL decode, so each such file is converted, refused
or skipped exactly as the CPU pipeline does. :class:`DeviceViews` then runs
:class:`~mocolab.data.device_augment.DeviceTwoCrop`. ``data.on_corrupt``: ``fail`` raises the
:class:`~mocolab.data.images.CorruptImageError` naming the file; ``skip`` fills its place with a repeat of a
readable image of the batch and counts it, as the CPU paths do.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from mocolab.data import location
from mocolab.data.images import CorruptImageError, _corrupt, decode_rgb
from mocolab.data.sources import ArrayImages, ImageSource

logger = logging.getLogger(__name__)

_SOF_MARKERS = {0xC0, 0xC1, 0xC2}  # baseline, extended and progressive Huffman JPEG: what libjpeg decodes


@dataclass
class EncodedBatch:
    """A training batch before decoding: per image its payload (1-D uint8 file bytes, or ``[H, W, 3]`` uint8
    pixels), its location (for messages) and its index; ``skipped``: images whose bytes could not be read."""

    payloads: list[torch.Tensor]
    locations: list[str]
    index: torch.Tensor
    skipped: int = 0

    def pin_memory(self) -> EncodedBatch:
        """Page-locked copies (the DataLoader's ``pin_memory=True``), for asynchronous copies to the GPU."""
        return EncodedBatch([p.pin_memory() for p in self.payloads], self.locations, self.index, self.skipped)


class EncodedDataset(Dataset):
    """Items ``(payload, location, index)`` of ``source``; None for a file that cannot be read
    (``data.on_corrupt=skip``), as :class:`~mocolab.data.datasets.TwoCropDataset`."""

    def __init__(self, source: ImageSource, on_corrupt: str):
        self.source, self.on_corrupt = source, on_corrupt

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        if isinstance(self.source, ArrayImages):
            return torch.from_numpy(np.array(self.source.images[index])), f"#{index}", index
        where = self.source.paths[index]
        try:
            data = location.read_bytes(where)
        except OSError as err:
            error = _corrupt(where, err)
            if self.on_corrupt != "skip":
                raise error from None
            logger.warning("data.on_corrupt=skip, skipped: %s", error)
            return None
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), where, index


def collate_encoded(batch: list) -> EncodedBatch:
    """DataLoader ``collate_fn``: an :class:`EncodedBatch` of the readable items (unreadable ones counted)."""
    kept = [item for item in batch if item is not None]
    if not kept:
        raise CorruptImageError(
            f"all {len(batch)} images of a batch are unreadable (data.on_corrupt=skip); check data.root"
        )
    return EncodedBatch(
        [item[0] for item in kept],
        [item[1] for item in kept],
        torch.tensor([item[2] for item in kept]),
        len(batch) - len(kept),
    )


def plain_jpeg(data: bytes) -> bool:
    """True for a JPEG that torchvision's ``decode_jpeg`` decodes as PIL does: 8-bit Huffman, one (grey) or three
    (YCbCr) components, ending in its EOI marker (a truncated file does not)."""
    if len(data) < 4 or data[:3] != b"\xff\xd8\xff" or data[-2:] != b"\xff\xd9":
        return False
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker, length = data[i + 1], int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in _SOF_MARKERS:
            return i + 10 <= len(data) and data[i + 4] == 8 and data[i + 9] in (1, 3)
        if marker == 0xDA or 0xC3 <= marker <= 0xCF:  # scan start before a frame, or another coding
            return False
        i += 2 + length
    return False


def _decode_one(payload: torch.Tensor, where: str, device: torch.device) -> torch.Tensor:
    """The PIL decode of the CPU pipeline (CorruptImageError naming ``where``), as ``[3, H, W]`` on ``device``."""
    rgb = decode_rgb(payload.numpy().tobytes(), where)
    return torch.from_numpy(np.require(rgb, requirements=["C", "W"])).permute(2, 0, 1).to(device, non_blocking=True)


def _decode_jpegs(payloads: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """torchvision's batched decode (one call; on a failure, one call per image: None for those that fail)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not payloads:
        return []
    try:
        return list(decode_jpeg(payloads, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        out: list[torch.Tensor | None] = []
        for payload in payloads:
            try:
                out.append(decode_jpeg(payload, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


def decode_images(
    payloads: Sequence[torch.Tensor], locations: Sequence[str], device: torch.device, on_corrupt: str
) -> tuple[list[torch.Tensor], int]:
    """Decode a batch to uint8 ``[3, H, W]`` images on ``device``; returns ``(images, skipped)``: with
    ``on_corrupt=skip`` an unreadable image is replaced by a repeat of a readable one (the batch keeps its size)."""
    images: list[torch.Tensor | None] = [None] * len(payloads)
    jpegs = []
    for i, payload in enumerate(payloads):
        if payload.dim() == 3:  # in-memory pixels [H, W, 3]
            images[i] = payload.permute(2, 0, 1).to(device, non_blocking=True)
        elif plain_jpeg(payload.numpy().tobytes()):
            jpegs.append(i)
    for i, image in zip(jpegs, _decode_jpegs([payloads[i] for i in jpegs], device)):
        images[i] = image
    failed = []
    for i, image in enumerate(images):
        if image is None:
            try:
                images[i] = _decode_one(payloads[i], locations[i], device)
            except CorruptImageError as err:
                if on_corrupt != "skip":
                    raise
                logger.warning("data.on_corrupt=skip, skipped: %s", err)
                failed.append(i)
    kept = [image for image in images if image is not None]
    if not kept:
        raise CorruptImageError(
            f"all {len(images)} images of a batch are unreadable (data.on_corrupt=skip); check data.root"
        )
    for n, i in enumerate(failed):
        images[i] = kept[n % len(kept)]
    return images, len(failed)


class DeviceViews:
    """The training loop's step from a batch to its views on ``device``: an :class:`EncodedBatch` (or rows of the
    Ray Data stream with the same fields) -> ``(view_q, view_k, index, skipped)``; the batch keeps its size."""

    def __init__(self, augment, image_size: int, on_corrupt: str, device: torch.device, batch_size: int):
        from mocolab.data.device_augment import device_two_crop

        self.transform = device_two_crop(augment, image_size).to(device)
        self.on_corrupt, self.device, self.batch_size = on_corrupt, device, batch_size

    def __call__(self, batch: EncodedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        images, skipped = decode_images(batch.payloads, batch.locations, self.device, self.on_corrupt)
        index = batch.index
        missing = self.batch_size - len(images)  # the loader's unreadable files: refill with repeats
        if missing > 0:
            images = images + [images[i % len(images)] for i in range(missing)]
            index = torch.cat([index, index[torch.arange(missing) % len(index)]])
        view_q, view_k = self.transform(images)
        return view_q, view_k, index.to(self.device, non_blocking=True), batch.skipped + skipped


def two_crop_bytes(
    files: Sequence[bytes], augment, image_size: int, device="cpu", on_corrupt: str = "fail"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The device pipeline on a list of encoded images (e.g. JPEG bytes): decode and two-crop them on ``device``;
    returns ``(view_q, view_k)`` normalised float ``[N, 3, S, S]`` (what ``mocolab bench`` and ``gpu_check.sh``
    time)."""
    device = torch.device(device)
    views = DeviceViews(augment, image_size, on_corrupt, device, batch_size=len(files))
    payloads = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in files]
    batch = EncodedBatch(payloads, [f"#{i}" for i in range(len(files))], torch.arange(len(files)))
    view_q, view_k, _, _ = views(batch)
    return view_q, view_k
