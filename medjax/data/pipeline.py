"""grain loaders: a split's records -> decoded, transformed, normalised NHWC numpy batches.

The stream is a grain `MapDataset` of slots (epoch, record index, real or padding), so element n of a loader is a
pure function of (dataset, split, seed, shard, n): a restored iterator yields exactly the same batches, and the
per-record work (decode + transforms) runs on grain's read threads (Pillow releases the GIL) even with 0 workers.

Train order: epoch e is a permutation of the split drawn from `numpy.random.default_rng((seed, 0, e))`. Process k
of P takes positions k, k + P, k + 2P, ... of it, as many as fill whole batches (the same count on every process,
(N // P) // batch_size batches); the rest of the epoch is dropped, and epoch e + 1 follows. Eval order: the split in
its order, padded with mask=False slots to a multiple of P * batch_size; process k takes the k-th contiguous block,
so concatenating the processes' batches in process order gives the split in order.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

import grain
import jax
import numpy as np
from absl import flags

from medjax.data import volumes
from medjax.data.records import IMAGENET_MEAN, IMAGENET_STD, DataError, Dataset
from medjax.data.transforms import (
    LoadAndTransform,
    Normalize,
    RawImages,
    Slot,
    resize_size,
)

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
BACKBONE_STATS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "clip": (CLIP_MEAN, CLIP_STD)}
log = logging.getLogger(__name__)


class TrainOrder:
    """Slot n of one process's infinite (or num_epochs long) shuffled stream; a random-access grain source."""

    def __init__(self, num_records: int, batch_size: int, seed: int, shard_index: int, shard_count: int,
                 num_epochs: int | None):
        self.n, self.seed, self.shard_index, self.shard_count = num_records, seed, shard_index, shard_count
        self.per_epoch = (num_records // shard_count) // batch_size * batch_size
        self.length = sys.maxsize if num_epochs is None else num_epochs * self.per_epoch

    @functools.lru_cache(maxsize=4)
    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, 0, epoch)).permutation(self.n)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, n: int) -> Slot:
        epoch, k = divmod(n, self.per_epoch)
        return Slot(epoch, int(self.permutation(epoch)[k * self.shard_count + self.shard_index]))


class EvalOrder:
    """Slot n of one process's contiguous block of the split, padded to whole batches on every process."""

    def __init__(self, num_records: int, batch_size: int, shard_index: int, shard_count: int):
        step = batch_size * shard_count
        self.n, self.per_shard = num_records, -(-num_records // step) * step // shard_count
        self.start = shard_index * self.per_shard

    def __len__(self) -> int:
        return self.per_shard

    def __getitem__(self, n: int) -> Slot:
        i = self.start + n
        return Slot(0, i, True) if i < self.n else Slot(0, 0, False)


def normalization_stats(dataset: Dataset, normalization) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """'dataset' (the dataset's statistics), 'imagenet' or 'clip' (a backbone's; the red channel's for grayscale
    data, matching the red-filter reduction of the patch embedding), or an explicit (mean, std)."""
    if isinstance(normalization, str):
        if normalization == "dataset":
            return tuple(dataset.mean), tuple(dataset.std)
        if normalization not in BACKBONE_STATS:
            raise DataError(f"normalization={normalization!r}: expected 'dataset', 'imagenet', 'clip' or (mean, std)")
        mean, std = BACKBONE_STATS[normalization]
        return mean[:dataset.channels], std[:dataset.channels]
    mean, std = (tuple(float(v) for v in np.atleast_1d(x)) for x in normalization)
    if len(mean) != dataset.channels or len(std) != dataset.channels:
        raise DataError(f"normalization {normalization} needs {dataset.channels} value(s) per statistic")
    return mean, std


def _shards(shard_index, shard_count):
    if shard_index is None or shard_count is None:
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise DataError(f"shard_index {shard_index} is not in [0, shard_count={shard_count})")
    return shard_index, shard_count


def num_batches(dataset: Dataset, split: str, batch_size: int, *, train: bool, shard_count: int | None = None) -> int:
    """Batches per epoch that each process's loader yields for `split` (train: full batches only; eval: padded)."""
    _, shard_count = _shards(0 if shard_count else None, shard_count)
    n = len(dataset.splits[split])
    return (n // shard_count) // batch_size if train else -(-n // (batch_size * shard_count))


def make_loader(dataset: Dataset, split: str, *, batch_size: int, image_size: int = 224, train: bool, seed: int = 0,
                normalization="dataset", shard_index: int | None = None, shard_count: int | None = None,
                num_epochs: int | None = None, worker_count: int = 0, read_threads: int | None = None,
                prefetch: int | None = None, augment: bool = True, resize: str = "square") -> grain.DatasetIterator:
    """An iterator of batches {'image': float32 (B, S, S, C) normalised NHWC, 'label': int32 (B,) for multi-class or
    float32 (B, K) multi-hot for multi-label, 'mask': bool (B,) False on padding} over one split.

    resize: 'square' (the reference study: resize to S' x S', then crop) or 'shorter' (the shorter side to S', aspect
    kept, torchvision's Resize(S') as the glioma study), S' = S * 256 / 224.
    train=True: reference train transforms (augment=False: the eval transform, as the glioma study trained),
    reshuffled every epoch from `seed`, incomplete last batch dropped, repeated `num_epochs` times (None: forever).
    train=False: eval transforms, one pass in order, the last batch padded to `batch_size` with mask=False rows.
    Sharding: process `shard_index` of `shard_count` (defaults: this JAX process of all) gets its share; every
    process gets the same number of batches.
    normalization: 'dataset', 'imagenet', 'clip' or (mean, std). worker_count > 0 adds grain worker processes (the
    batch is formed after them, so no data is lost); read_threads/prefetch tune grain's read threads (defaults: CPU
    count, max(2 * batch_size, 2 * threads)).

    The returned grain `DatasetIterator` supports get_state()/set_state() (JSON-serialisable, for
    grain.checkpoint / orbax): a restored iterator continues with exactly the same batches.
    """
    if split not in dataset.splits:
        raise DataError(f"dataset {dataset.name} has no split {split!r}; it has {list(dataset.splits)}")
    if dataset.name == "volumes" and not int(dataset.options.get("max_slices") or 0):
        raise DataError("dataset 'volumes': batches of 3-D studies need a fixed number of slices per volume; set the "
                        "data option max_slices (e.g. --config.data_options.max_slices=16)")
    if batch_size < 1:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    records = dataset.splits[split]
    shard_index, shard_count = _shards(shard_index, shard_count)
    if train:
        order = TrainOrder(len(records), batch_size, seed, shard_index, shard_count, num_epochs)
        if order.per_epoch == 0:
            raise DataError(f"{dataset.name} split {split!r} has {len(records)} images, fewer than one batch of "
                            f"{batch_size} on each of {shard_count} process(es)")
    else:
        order = EvalOrder(len(records), batch_size, shard_index, shard_count)
    mean, std = normalization_stats(dataset, normalization)
    if dataset.prepared is not None:  # a prepared dataset: its stored images (`prepared.py`)
        images = dataset.prepared
        if resize != images.resize:  # a square copy has lost the aspect ratio that resize='shorter' keeps
            raise DataError(f"{dataset.root} was prepared for resize={images.resize!r}; this run asks for "
                            f"resize={resize!r}: prepare again with --resize {resize} into another --output")
        if resize_size(image_size) != images.max_size:
            log.warning("%s was prepared for a %d px resize; image_size %d resizes to %d px, so the stored images are "
                        "resized again and the batches differ from the raw files' (exact: prepare again with "
                        "--max-size %d)", dataset.root, images.max_size, image_size, resize_size(image_size),
                        resize_size(image_size))
    else:
        images = RawImages(dataset.channels, resize_size(image_size) if dataset.jpeg_draft else None)
    common = dict(channels=dataset.channels, num_classes=dataset.num_classes, multilabel=dataset.task == "multilabel",
                  image_size=image_size, train=train and augment, seed=seed, failures=dataset.load_failures,
                  failure_log=dataset.failure_log, resize=resize)
    if dataset.name == "volumes":  # a record is a 3-D study: (max_slices, S, S, 1) per row (medjax.data.volumes)
        load = volumes.load_volume_transform(LoadAndTransform)(records, options=dataset.options, **common)
    else:
        load = LoadAndTransform(records, images=images, **common)
    threads = read_threads if read_threads is not None else min(16, os.cpu_count() or 1)
    buffer = prefetch if prefetch is not None else max(2 * batch_size, 2 * threads)
    normalize = Normalize(mean, std)
    ds = grain.MapDataset.source(order).map(load)
    if worker_count == 0:
        ds = ds.map(normalize)  # on the read threads
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer))
    if worker_count > 0:
        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    ds = ds.batch(batch_size, drop_remainder=train)
    if worker_count > 0:
        ds = ds.map(normalize)  # uint8 crosses the process boundary: 4x less to copy than float32
    return iter(ds)
