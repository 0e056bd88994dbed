"""``data.reader=stream``: the pretraining images as a Ray Data dataset, read, decoded and two-crop augmented in
Ray Data's CPU tasks (which Ray may place on CPU-only nodes), reaching the Ray Train workers through
``ray.train.get_dataset_shard("train")``.

The driver lists the training split once (:func:`mocolab.data.sources.image_source`: the same files, order,
``data.limit_train`` and indices as the loader path) and makes rows ``(location, index)``, in a seeded order, in
blocks of :data:`ROWS_PER_BLOCK`. Every epoch Ray Data puts the blocks in a new seeded order
(``randomize_block_order``: no shuffle tasks, whose all-to-all barrier cost seconds per epoch on 2 CPUs) and each
worker mixes its rows in a local shuffle buffer of :data:`SHUFFLE_BUFFER_BATCHES` batches, so batches differ from
epoch to epoch (a block's rows stay near each other: not the loader's full permutation); :class:`TwoCropBatch` reads
each file through :mod:`mocolab.data.location`, decodes it and makes the two views with the same recipe
(``data.augment``, uint8 views on the fast path as in the loader; they travel ``[N, S, S, 3]``, as made, and
reach the step as the loader's ``[N, 3, S, S]`` channels-last batch). ``data.on_corrupt`` behaves as in the loader:
``fail`` raises the :class:`~mocolab.data.images.CorruptImageError` naming the file; ``skip`` fills the row with a
repeat of a readable
image of the same map batch and counts it in the ``skipped`` column. Ray Train splits the stream equally
(``streaming_split(equal=True)``), so every worker runs ``(N // world size) // batch size`` steps per epoch, as the
DistributedSampler does.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from mocolab.config import DataConfig
from mocolab.data.augment import two_crop_transform
from mocolab.data.images import CorruptImageError, two_crops_of_file
from mocolab.data.sources import FileImages

MAP_BATCH_SIZE = 64
ROWS_PER_BLOCK = 8  # the unit the per-epoch block order moves: small, so an epoch's batches mix freely
SHUFFLE_BUFFER_BATCHES = 4  # each worker's local shuffle buffer, in training batches


@functools.lru_cache(maxsize=4)
def _transform(augment_json: str, image_size: int):
    import json

    return two_crop_transform(json.loads(augment_json), image_size)


def read_each(locations, read, on_corrupt: str) -> tuple[list, list[int], np.ndarray]:
    """``read(location)`` for each of a batch's ``locations``: ``(items, source, skipped)``. A file ``read`` refuses
    (:class:`CorruptImageError`) fails the batch, or with ``data.on_corrupt=skip`` is flagged in ``skipped`` and its
    row takes a readable item of the batch (``source[i]``: the item row ``i`` holds)."""
    items, skipped = [], np.zeros(len(locations), dtype=np.int64)
    for i, where in enumerate(locations):
        try:
            items.append(read(str(where)))
        except CorruptImageError:
            if on_corrupt != "skip":
                raise
            items.append(None)
            skipped[i] = 1
    kept = [i for i, item in enumerate(items) if item is not None]
    if not kept:
        raise CorruptImageError(
            f"all {len(items)} images of a batch are unreadable (data.on_corrupt=skip); check data.root"
        )
    return items, [i if items[i] is not None else kept[i % len(kept)] for i in range(len(items))], skipped


class TwoCropBatch:
    """Ray Data ``map_batches`` function: rows ``{location, index}`` -> ``{view_q, view_k, index, skipped}``."""

    def __init__(self, data_cfg: DataConfig):
        import json

        self.augment = json.dumps(data_cfg.augment)
        self.image_size, self.on_corrupt = data_cfg.image_size, data_cfg.on_corrupt

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        transform = _transform(self.augment, self.image_size)
        views, source, skipped = read_each(
            batch["location"], functools.partial(two_crops_of_file, transform), self.on_corrupt
        )
        return {
            "view_q": np.stack([_as_made(views[j][0]) for j in source]),
            "view_k": np.stack([_as_made(views[j][1]) for j in source]),
            "index": np.asarray(batch["index"], dtype=np.int64)[source],
            "skipped": skipped,
        }


def _as_made(view) -> np.ndarray:
    """A view's array in the layout it was made in: uint8 views (the fast path's) ``[S, S, 3]``, stacked without
    a transposition (:func:`_channels_first` undoes it on the worker); float views ``[3, S, S]``."""
    return view.permute(1, 2, 0).numpy() if view.dtype == torch.uint8 else view.numpy()


def _channels_first(views):
    """A batch of views ``[N, 3, S, S]`` from the stream's column (uint8 ``[N, S, S, 3]``: channels-last memory)."""
    return views.permute(0, 3, 1, 2) if views.dtype == torch.uint8 else views


class ReadBytesBatch:
    """``data.pipeline=device``: Ray Data ``map_batches`` function: rows ``{location, index}`` -> the files' bytes
    ``{payload, location, index, skipped}``; decode and augmentation happen on the training worker's device
    (:mod:`mocolab.data.encoded`). A file that cannot be read follows ``data.on_corrupt`` as :class:`TwoCropBatch`."""

    def __init__(self, data_cfg: DataConfig):
        self.on_corrupt = data_cfg.on_corrupt

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from mocolab.data import location
        from mocolab.data.images import _corrupt

        def read(where: str) -> bytes:
            try:
                return location.read_bytes(where)
            except OSError as err:
                raise _corrupt(where, err) from None

        payloads, source, skipped = read_each(batch["location"], read, self.on_corrupt)
        column = np.empty(len(source), dtype=object)
        column[:] = [payloads[j] for j in source]
        return {
            "payload": column,
            "location": np.asarray([str(batch["location"][j]) for j in source], dtype=object),
            "index": np.asarray(batch["index"], dtype=np.int64)[source],
            "skipped": skipped,
        }


def pretrain_dataset(files: FileImages, data_cfg: DataConfig, seed: int, num_workers: int):
    """The Ray Data dataset of the two-crop views of ``files`` (the training split's image files, as
    :func:`mocolab.data.sources.image_source` lists them); lazy: nothing runs until a worker iterates.

    Decode tasks ask for ``data.stream_cpus`` CPUs each, and Ray Data runs as many as the CPUs the training workers
    leave free; with 0 (no CPU to spare) it runs one per training worker beside them, as one loader process each."""
    import ray.data
    from ray.data import RandomSeedConfig

    rows = [{"location": where, "index": i} for i, where in enumerate(files.paths)]
    cpus = data_cfg.stream_cpus
    order = np.random.default_rng(seed).permutation(len(rows))  # rows in a block: a seeded mix, not file order
    dataset = (
        ray.data.from_items([rows[i] for i in order], override_num_blocks=max(1, len(rows) // ROWS_PER_BLOCK))
        .randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
        .map_batches(
            TwoCropBatch(data_cfg) if data_cfg.pipeline == "cpu" else ReadBytesBatch(data_cfg),
            batch_size=MAP_BATCH_SIZE,
            batch_format="numpy",
            num_cpus=cpus,
            concurrency=num_workers if cpus == 0 else None,
            zero_copy_batch=True,
        )
    )
    dataset.context.enable_progress_bars = False  # the workers draw mocolab's own epoch bar
    return dataset


def steps_per_epoch(num_images: int, world_size: int, batch_size: int) -> int:
    """Steps every worker runs per epoch: its equal share of the rows, in whole batches."""
    return (num_images // world_size) // batch_size


class ShardBatches:
    """This worker's shard, iterated afresh by every ``for`` (one epoch), as a DataLoader is: yields
    ``((view_q, view_k, index), skipped)`` per batch, as the loader path does; with ``data.pipeline=device``
    (``encoded``) an :class:`~mocolab.data.encoded.EncodedBatch` of the files' bytes, as the device loader does."""

    def __init__(self, shard, batch_size: int, seed: int, encoded: bool = False):
        self.shard, self.batch_size, self.seed, self.encoded = shard, batch_size, seed, encoded

    def __iter__(self) -> Iterator[Any]:
        shuffle = {
            "local_shuffle_buffer_size": SHUFFLE_BUFFER_BATCHES * self.batch_size,
            "local_shuffle_seed": self.seed,
        }
        if self.encoded:
            yield from self._encoded(shuffle)
            return
        for batch in self.shard.iter_torch_batches(batch_size=self.batch_size, drop_last=True, **shuffle):
            views = (_channels_first(batch["view_q"]), _channels_first(batch["view_k"]))
            yield (*views, batch["index"]), int(batch["skipped"].sum())

    def _encoded(self, shuffle: dict[str, Any]):
        import torch

        from mocolab.data.encoded import EncodedBatch

        for batch in self.shard.iter_batches(
            batch_size=self.batch_size, drop_last=True, batch_format="numpy", **shuffle
        ):
            payloads = [torch.frombuffer(bytearray(p), dtype=torch.uint8) for p in batch["payload"]]
            yield EncodedBatch(
                payloads, [str(w) for w in batch["location"]], torch.tensor(batch["index"]), int(batch["skipped"].sum())
            )
