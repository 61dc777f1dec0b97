"""Reading a prepared dataset: a folder written by `python -m medjax.data prepare` (`prepare.py`), used wherever a
dataset root is (`get_dataset(name, DIR)`, `config.data_root=DIR`), detected by its `medjax_prepared.json`.

Layout of DIR:
    medjax_prepared.json          what was prepared: dataset, reader options, classes, statistics, how the images
                                  were stored (image: max_size, resize, format), the records of every split in order
                                  (original path relative to the raw root, label, patient, origin, stored and original
                                  size), skipped and excluded images, the digest
    medjax_prepared/1.0.0/        a TFDS dataset in ArrayRecord format, one TFDS split per medjax split, records in
                                  split order: image (format raw: the uint8 pixels, row-major H x W x C bytes, the
                                  shape in the metadata; png or jpeg: the encoded file), label, patient, path

The images are read with random access through `tfds.builder_from_directory(...).as_data_source(split)` (PNG/JPEG
bytes undecoded, `tfds.decode.SkipDecoding`, then decoded with Pillow; raw bytes viewed as an array, no decoder);
TensorFlow is never imported. The splits, labels and reader options are those of the prepare run: a run that asks
for other reader options (another split seed, another label policy) is refused with the option named, since the
records were fixed when preparing. Format version 1 (PNG or JPEG of the shorter side at 256 px, medjax before
issue 24) is refused with one line saying to prepare again.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import threading

import numpy as np
from PIL import Image

from medjax import rundir
from medjax.data.records import DataError, Dataset, Record, leaves_root, take_options
from medjax.data.transforms import decode_bytes
from medjax.errors import atomic_write
from medjax.pretrained import file_sha256

log = logging.getLogger(__name__)
METADATA = "medjax_prepared.json"
FORMAT = "medjax-prepared"
VERSION = 2  # 2: stored at the loader's resize (square or shorter), raw uint8 by default; 1: PNG/JPEG, shorter side
BUILDER_NAME = "medjax_prepared"
DIGEST_KEY = "metadata_digest"  # SHA-256 of the metadata without this key, checked on open


def metadata_digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def is_prepared(root: str) -> bool:
    """True if `root` is a complete prepared dataset (its metadata is written last, so a killed prepare is not)."""
    return os.path.isfile(os.path.join(root, METADATA))


def read_metadata(root: str) -> dict:
    path = os.path.join(root, METADATA)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the prepared dataset's metadata ({e}); prepare the dataset again") \
            from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path}: not a medjax prepared dataset's metadata (no \"format\": \"{FORMAT}\")")
    if meta.get("version") != VERSION:
        raise DataError(f"{path}: prepared dataset format version {meta.get('version')!r}; this medjax reads "
                        f"version {VERSION} (images stored at the training size, read without decoding): prepare the "
                        "dataset again (python -m medjax.data prepare) into a new --output")
    if meta.get(DIGEST_KEY) != metadata_digest(meta):
        raise DataError(f"{path}: edited or damaged: its content (records, labels, splits, files) no longer matches "
                        f"the {DIGEST_KEY} written with it; a prepared dataset's records are fixed when it is "
                        "prepared: prepare the dataset again (with the labels changed in the raw files)")
    return meta


def record_digest(split: str, index: int, image: bytes, label, patient: str, path: str) -> bytes:
    """The digest of one stored record; a dataset's digest is the SHA-256 over its records' digests in order."""
    h = hashlib.sha256()
    h.update(json.dumps([split, index, label, patient, path]).encode())
    h.update(hashlib.sha256(image).digest())
    return h.digest()


def _as_json(value):
    return json.loads(json.dumps(value))


def _unused(help_text: str) -> bool:
    return help_text.strip().lower().startswith("unused")


def check_options(meta: dict, name: str, options: dict, declared: dict, root: str) -> None:
    """The reader options asked for must be those the dataset was prepared with (defaults filled on both sides)."""
    if name != meta["dataset"]:
        raise DataError(f"{root}: a prepared {meta['dataset']!r} dataset ({METADATA}), not {name!r}; ask for "
                        f"dataset {meta['dataset']!r} (config.dataset={meta['dataset']})")
    asked = take_options(declared, options, name)
    stored = meta.get("options", {})
    for key, (_, help_text) in declared.items():
        if _unused(help_text):
            continue
        if _as_json(asked[key]) != stored.get(key):
            raise DataError(f"{root}: prepared with {name} option {key}={stored.get(key)!r}, but {key}="
                            f"{asked[key]!r} was asked for; the splits and labels are fixed when a dataset is "
                            f"prepared: ask for {key}={stored.get(key)!r}, or prepare again from the raw files with "
                            f"--option {key}={json.dumps(asked[key])}")


class PreparedImages:
    """Record -> 8-bit PIL image from a prepared dataset's ArrayRecord files, by the record's (split, index).

    max_size, resize: the loader resize the images were stored for (`prepare.py`); image_format: raw, png or jpeg.
    The TFDS data sources open lazily in each process that reads (grain worker processes get a copy without them).
    """

    def __init__(self, root: str, builder_dir: str, locations: dict[str, tuple[str, int, tuple[int, int]]],
                 channels: int, max_size: int, resize: str = "square", image_format: str = "raw"):
        self.root, self.builder_dir, self.locations = root, builder_dir, locations
        self.channels, self.max_size, self.resize, self.image_format = channels, max_size, resize, image_format
        self._sources: dict = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_sources", "_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._sources, self._lock = {}, threading.Lock()

    def source(self, split: str):
        """The TFDS ArrayRecord data source of a split (examples with undecoded image bytes)."""
        src = self._sources.get(split)
        if src is None:
            with self._lock:
                src = self._sources.get(split)
                if src is None:
                    src = open_split(os.path.join(self.root, self.builder_dir), split)
                    self._sources[split] = src
        return src

    def example(self, record: Record) -> dict:
        split, index, _ = self.locations[record.path]
        return self.source(split)[index]

    def read(self, record: Record):
        """The record's stored image; raises if the stored record is another image (files not from this prepare)."""
        example = self.example(record)
        stored, expected = example["path"].decode(), os.path.relpath(record.path, self.root).replace(os.sep, "/")
        split, index, (width, height) = self.locations[record.path]
        if stored != expected:
            raise ValueError(f"record {index} of the prepared split {split!r} is {stored!r}, not {expected!r}: the "
                             f"ArrayRecord files do not match {METADATA}; prepare the dataset again")
        if self.image_format != "raw":
            return decode_bytes(example["image"], self.channels)
        return raw_image(example["image"], width, height, self.channels)


def raw_image(data: bytes, width: int, height: int, channels: int) -> Image.Image:
    """A stored raw image (row-major uint8 H x W x C bytes) as an 'L' or 'RGB' PIL image (one copy, no decoding)."""
    if len(data) != width * height * channels:
        raise ValueError(f"stored image holds {len(data)} bytes, {width} x {height} x {channels} = "
                         f"{width * height * channels} expected; prepare the dataset again")
    shape = (height, width, 3) if channels == 3 else (height, width)
    return Image.fromarray(np.frombuffer(data, np.uint8).reshape(shape))  # uint8 (H, W, 3): RGB; (H, W): L


def open_split(builder_path: str, split: str):
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(builder_path)
    encoded = isinstance(builder.info.features["image"], tfds.features.Image)  # png/jpeg; raw: plain bytes
    return builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()} if encoded else None)


def check_files(meta: dict, root: str, level: str, workdir: str | None) -> None:
    """The prepared files at `level`: 'exists' (every ArrayRecord and TFDS metadata file is there), 'verify' (and has
    the size and SHA-256 recorded when it was written; cached in the work directory by size and time). A damaged
    file cannot be skipped image by image: DataError naming it."""
    if level == "none":
        return
    files = meta["tfds"]["files"]
    cache_path = rundir.split_file(workdir, meta["dataset"], "prepared_checked.json") if workdir else None
    cached = {}
    if cache_path and os.path.isfile(cache_path):
        try:
            with open(cache_path) as f:
                cached = json.load(f)
        except (OSError, ValueError):
            cached = {}
    good = {}
    for rel, want in files.items():
        path = os.path.join(root, *rel.split("/"))
        try:
            st = os.stat(path)
        except OSError:
            raise DataError(f"{path}: file of the prepared dataset {root} is missing; prepare the dataset again") \
                from None
        if level in ("verify", "decode"):
            stamp = f"{st.st_size}:{st.st_mtime_ns}:{want['sha256']}"
            if cached.get(rel) != stamp:
                if st.st_size != want["bytes"] or file_sha256(path) != want["sha256"]:
                    raise DataError(f"{path}: damaged file of the prepared dataset {root} ({st.st_size} bytes, "
                                    f"{want['bytes']} written; its SHA-256 differs from the one recorded in "
                                    f"{METADATA}); prepare the dataset again")
            good[rel] = stamp
    if cache_path and good and good != cached:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        with atomic_write(cache_path) as f:
            json.dump(good, f)


def _decode_all(dataset: Dataset) -> list[tuple[Record, str]]:
    """(record, reason) of every stored image that does not decode, in record order."""
    images: PreparedImages = dataset.prepared
    records = [r for recs in dataset.splits.values() for r in recs]

    def reason(r):
        try:
            images.read(r)
        except Exception as e:  # noqa: BLE001 - reported with the record
            return f"cannot decode the stored image ({type(e).__name__}: {e})"
        return None

    with concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        return [(r, why) for r, why in zip(records, pool.map(reason, records)) if why is not None]


def load(name: str, root: str, options: dict, declared: dict, *, check_images: str, skip_bad_images: bool,
         workdir: str | None) -> Dataset:
    """The Dataset of a prepared folder: records and splits as prepared, images read from the ArrayRecord files."""
    meta = read_metadata(root)
    check_options(meta, name, options, declared, root)
    builder_dir = meta["tfds"]["builder_dir"]
    if leaves_root(builder_dir) or any(leaves_root(rel) for rel in meta["tfds"]["files"]):
        raise DataError(f"{os.path.join(root, METADATA)}: a TFDS path leaves the prepared folder; prepare again")
    multilabel = meta["task"] == "multilabel"

    def path_of(rel: str, origin: str) -> str:
        if leaves_root(rel):
            raise DataError(f"{os.path.join(root, METADATA)}: record path {rel!r} ({origin}) leaves the prepared "
                            "folder; prepare the dataset again")
        return os.path.join(root, *rel.split("/"))

    splits, locations = {}, {}
    for split, rows in meta["splits"].items():
        records = []
        for index, (rel, label, patient, origin, stored_size, _original) in enumerate(rows):
            record = Record(path_of(rel, origin), tuple(label) if multilabel else int(label), patient, origin)
            records.append(record)
            locations.setdefault(record.path, (split, index, tuple(stored_size)))
        splits[split] = records
    stats = meta["statistics"]
    dataset = Dataset(meta["dataset"], meta["task"], list(meta["class_names"]), int(meta["channels"]),
                      meta["target_metric"], tuple(stats["mean"]), tuple(stats["std"]), splits, root=root,
                      options=dict(meta["options"]), statistics_source=stats["source"],
                      skipped=[(path_of(rel, o), o, why) for rel, o, why in meta.get("skipped", [])],
                      excluded=[(path_of(rel, o), o, why) for rel, o, why in meta.get("excluded", [])])
    dataset.skip_bad_images = skip_bad_images
    image = meta["image"]
    dataset.prepared = PreparedImages(root, builder_dir, locations, dataset.channels, int(image["max_size"]),
                                      image["resize"], image["format"])
    check_files(meta, root, check_images, workdir)
    if check_images == "decode":
        bad = _decode_all(dataset)
        if bad and not skip_bad_images:
            listed = "; ".join(f"{r.path} ({r.origin}): {why}" for r, why in bad[:20])
            raise DataError(f"{len(bad)} stored image(s) of the prepared dataset {root} cannot be read (decode "
                            f"check): {listed}. Prepare the dataset again, or pass skip_bad_images=True")
        if bad:
            gone = {id(r) for r, _ in bad}
            dataset.skipped.extend((r.path, r.origin, why) for r, why in bad)
            dataset.splits = {s: [r for r in recs if id(r) not in gone] for s, recs in dataset.splits.items()}
    return dataset
