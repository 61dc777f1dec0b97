"""`python -m medjax.data prepare`: decode every image of a dataset once and store it at the training size, as a TFDS
dataset in ArrayRecord format that the loader reads with random access (`prepared.py` describes the folder).

    prepare("aptos2019", "/data/aptos", "/data/aptos_prepared")
    data.get_dataset("aptos2019", "/data/aptos_prepared")  # then a dataset root like any other

What is stored (format version 2): each image decoded as the raw loader decodes it (`transforms.decode`: DICOM
windowing, 16-bit scaling, the dataset's channels; JPEGs decoded in full), then put through the loader's own first
step, the resize before the crops (`transforms.resize_center_crop` without the crop): with `resize="square"` (the
reference study) to `max_size` x `max_size` (aspect not kept), with `resize="shorter"` the shorter side to `max_size`
(aspect kept, the longer side int(max_size * long / short)), Pillow's antialiased bilinear filter. `max_size` is the
loader's resize target round(S * 256 / 224) for image_size S: 256 for 224 px (the crop margin is 16 px a side). An
image with no more pixels than that output is stored as decoded. Either way, the loader's resize of the stored image
gives the raw pipeline's pixels, so a prepared batch equals the raw batch bit for bit when the loader's image_size
and resize are those prepared for (docs/data.md, "Prepared datasets"). The pixels are stored as a raw uint8 array
(`format="raw"`, the default: row-major H x W x C bytes, compressed losslessly by ArrayRecord's zstd, no image
decoder on reading), as PNG, or as JPEG at `quality` (4:4:4). The splits, labels, patients and original paths are
those the reader gives for the reader options used; statistics computed from the data are computed on the raw images.

Resumable and never half-visible: the work is done in `OUTPUT/.medjax_prepare_partial/`: images are converted in
chunks of `CHUNK` records by `workers` processes, each chunk written atomically, so a restarted prepare (same
request) converts only the missing chunks. The TFDS dataset is then written from the chunks (TFDS writes into an
`incomplete.*` folder and renames it when done) and `medjax_prepared.json` is written last, atomically: a folder
without it is not a prepared dataset. Bad input (a missing or undecodable image without --skip-bad-images, an output
that holds something else) is one DataError, and nothing of this run is left behind.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import io
import json
import logging
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import sys
import threading
import time

import numpy as np
from tqdm import tqdm

from medjax import data
from medjax.data import prepared
from medjax.data.records import DataError, Dataset, check_inside_root, leaves_root, take_options
from medjax.data.records import allow_outside_root as allowing_outside_root
from medjax.data.transforms import BILINEAR, RESIZE_MODES, decode, resize_output_size
from medjax.errors import atomic_write
from medjax.pretrained import file_sha256

log = logging.getLogger(__name__)
DEFAULT_MAX_SIZE = 256  # the reference resize before the 224 px crops (resize_size(224))
FORMATS = ("raw", "png", "jpeg")  # raw: uint8 array bytes (ArrayRecord's zstd compresses them); no decode on reading
PARTIAL = ".medjax_prepare_partial"
CHUNK = 256
MAX_LISTED = 20
RULE = {"square": "the loader's resize: to max_size x max_size (aspect not kept), Pillow bilinear (antialiased), "
                  "when that has fewer pixels than the image; else the image as decoded",
        "shorter": "the loader's resize: the shorter side to max_size, the longer int(max_size * long / short) "
                   "(aspect kept), Pillow bilinear (antialiased), when that has fewer pixels; else as decoded"}
# Test hook: SIGKILL this process at a point of the work ("chunk:N", "example:N" or "metadata").
KILL_ENV = "MEDJAX_PREPARE_SIGKILL_AT"


def _maybe_kill(point: str, count: int | None = None) -> None:
    at = os.environ.get(KILL_ENV, "")
    if at and at == (point if count is None else f"{point}:{count}"):
        os.kill(os.getpid(), signal.SIGKILL)


def _say(message: str) -> None:
    """A phase of the work, announced on stderr (stdout carries the summary)."""
    print(message, file=sys.stderr, flush=True)


def stored_size(width: int, height: int, max_size: int, resize: str = "square") -> tuple[int, int]:
    """The stored (width, height): the loader's resize output for target `max_size` and mode `resize`
    (`transforms.resize_output_size`), or the original size when that has no more pixels."""
    out_w, out_h = resize_output_size(width, height, max_size, resize)
    return (out_w, out_h) if out_w * out_h < width * height else (width, height)


def convert_image(path: str, channels: int, max_size: int, image_format: str, quality: int, resize: str = "square"):
    """One image -> (stored bytes, stored (w, h), original (w, h))."""
    img = decode(path, channels)  # a full decode: the stored image is the quality path
    original = img.size
    size = stored_size(*original, max_size, resize)
    if size != original:
        img = img.resize(size, BILINEAR)  # the loader's own resize call: the same pixels
    if image_format == "raw":
        return np.asarray(img).tobytes(), size, original
    buf = io.BytesIO()
    if image_format == "png":
        img.save(buf, "PNG", compress_level=6)
    else:
        img.save(buf, "JPEG", quality=quality, subsampling=0)
    return buf.getvalue(), size, original


def convert_chunk(chunk_path: str, paths: list[str], channels: int, max_size: int, image_format: str,
                  quality: int, resize: str = "square") -> int:
    """Converts `paths` and writes [(ok, bytes or reason, size, original)] to chunk_path atomically; returns the
    number of images that could not be read."""
    out = []
    for path in paths:
        try:
            data, size, original = convert_image(path, channels, max_size, image_format, quality, resize)
            out.append((True, data, size, original))
        except Exception as e:  # noqa: BLE001 - every decoder failure is reported with the file and row
            reason = "file not found" if isinstance(e, FileNotFoundError) else \
                f"cannot decode ({type(e).__name__}: {e})"
            out.append((False, reason, None, None))
    with atomic_write(chunk_path, "wb") as f:
        pickle.dump(out, f, protocol=pickle.HIGHEST_PROTOCOL)
    return sum(not ok for ok, *_ in out)


def _die_with_parent(parent: int) -> None:
    """A worker's initializer: the worker exits when its parent is gone (a killed prepare leaves no worker
    converting on, holding memory): a daemon thread polls the parent pid twice a second."""

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="medjax-prepare-parent-watch").start()


def _read_chunk(path: str) -> list:
    with open(path, "rb") as f:
        return pickle.load(f)


def _label_json(label):
    return list(label) if isinstance(label, tuple) else int(label)


def _stored_path(dataset: Dataset, path: str) -> str:
    """A record's path as stored: relative to the raw root, '/'-separated; a path outside the root (only with
    allow_outside_root) under 'outside_root/'."""
    rel = dataset.relative(path).replace(os.sep, "/")
    if leaves_root(rel):
        rel = "outside_root/" + "/".join(p for p in re.split(r"[\\/]", rel) if p not in ("", ".", ".."))
    return rel


def _stamp(path: str) -> str:
    try:
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return "missing"


def _request(name: str, options: dict, max_size: int, resize: str, image_format: str, quality: int | None) -> dict:
    return json.loads(json.dumps({"dataset": name, "options": options, "max_size": max_size, "resize": resize,
                                  "format": image_format, "quality": quality if image_format == "jpeg" else None}))


def _builder_class():
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import utils as tfds_utils

    class PreparedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """A medjax dataset as TFDS: one TFDS split per split, records in split order (no shuffling)."""

        name = prepared.BUILDER_NAME
        VERSION = tfds.core.Version("1.0.0")

        @tfds_utils.classproperty
        @classmethod
        def code_path(cls):  # no checksums file beside the code (TFDS would look it up via importlib_resources)
            return None

        # TFDS prints "Downloading and preparing dataset ..." and "Dataset ... downloaded and prepared to ..." to
        # stdout from these two hooks; nothing is downloaded here, and prepare announces its own phases on stderr.
        def _log_download_bytes(self) -> None:
            pass

        def _log_download_done(self) -> None:
            pass

        def __init__(self, *, dataset: Dataset, image_format: str, description: str, examples, **kwargs):
            self._medjax = dataset
            self._image_format, self._description, self._examples = image_format, description, examples
            super().__init__(**kwargs)

        def _info(self):
            d = self._medjax
            label = (tfds.features.Tensor(shape=(d.num_classes,), dtype=np.uint8) if d.task == "multilabel"
                     else tfds.features.ClassLabel(names=list(d.class_names)))
            image = (tfds.features.Tensor(shape=(), dtype=np.object_) if self._image_format == "raw"  # the bytes
                     else tfds.features.Image(shape=(None, None, d.channels), encoding_format=self._image_format))
            features = tfds.features.FeaturesDict({
                "image": image,
                "label": label,
                "patient": tfds.features.Text(),
                "path": tfds.features.Text(),
            })
            return tfds.core.DatasetInfo(builder=self, description=self._description, features=features,
                                         disable_shuffling=True)  # records in split order: index i is record i

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in self._medjax.splits}

        def _generate_examples(self, split):
            yield from self._examples(split)

    return PreparedBuilder


def _clean_output(output: str, created: bool) -> None:
    """Removes what a failed run wrote: the work folder, a TFDS folder without metadata, and the output folder if
    this run created it."""
    for name in (PARTIAL, prepared.BUILDER_NAME):
        shutil.rmtree(os.path.join(output, name), ignore_errors=True)
    if created:
        with contextlib.suppress(OSError):
            os.rmdir(output)


def _check_output(output: str, raw_root: str, request: dict) -> dict | None:
    """The metadata of an identical finished prepare at `output` (nothing to do), or None to prepare there."""
    out, raw = os.path.normpath(output), os.path.normpath(raw_root)
    if out == raw or os.path.commonpath([out, raw]) == out:
        raise DataError(f"--output {output} holds the raw dataset {raw_root}; choose a folder outside it")
    if os.path.commonpath([out, raw]) == raw:  # a folder reader would take it for a class, a walk for more images
        raise DataError(f"--output {output} is inside the raw dataset {raw_root}; readers would take the prepared "
                        "files for part of the dataset; choose a folder outside it")
    if prepared.is_prepared(output):
        meta = prepared.read_metadata(output)
        done = {k: meta.get(k) for k in ("dataset", "options")}
        done.update({k: meta["image"].get(k) for k in ("max_size", "resize", "format", "quality")})
        if done == request:
            return meta
        diff = [f"{k}: {done.get(k)!r} there, {request[k]!r} asked" for k in request if done.get(k) != request[k]]
        raise DataError(f"{output}: already holds a prepared dataset made otherwise ({'; '.join(diff)}); choose "
                        "another --output or delete that folder")
    if os.path.exists(output):
        if not os.path.isdir(output):
            raise DataError(f"--output {output}: not a folder")
        others = sorted(set(os.listdir(output)) - {PARTIAL, prepared.BUILDER_NAME})
        if others:
            raise DataError(f"--output {output}: not empty ({', '.join(others[:5])}{' ...' if len(others) > 5 else ''})"
                            "; expected a new or empty folder, or one a killed prepare left")
    return None


def _raw_records(name: str, raw_root: str, options: dict, allow_outside_root: bool) -> Dataset:
    """The raw dataset's records as its reader lists them (no image check, no statistics): what a prepare stores."""
    with allowing_outside_root(allow_outside_root):
        dataset = data.READERS[name](raw_root, **options)
        check_inside_root(dataset)
    return dataset


def source_fingerprint(dataset: Dataset) -> str:
    """SHA-256 over the raw records (split, stored path, label, patient) and each image file's size and modification
    time: it changes when rows are added, removed or relabelled or an image file is replaced."""
    h = hashlib.sha256()
    for split, records in sorted(dataset.splits.items()):
        for r in records:
            h.update(json.dumps([split, _stored_path(dataset, r.path), _label_json(r.label), r.patient,
                                 _stamp(r.path)]).encode())
    return h.hexdigest()


def _check_fresh(meta: dict, name: str, raw_root: str, output: str, options: dict, allow_outside_root: bool) -> None:
    """A finished prepare at `output` is refused as stale when the raw source changed since (records added,
    removed, relabelled, or image files modified): the copy is never rewritten under a run that may use it."""
    dataset = _raw_records(name, raw_root, options, allow_outside_root)
    if meta["source"].get("fingerprint") == source_fingerprint(dataset):
        return
    old = {row[0]: (split, json.dumps(row[1])) for split, rows in meta["splits"].items() for row in rows}
    old.update({row[0]: None for row in meta.get("skipped", [])})
    new = {_stored_path(dataset, r.path): (split, json.dumps(_label_json(r.label)))
           for split, records in dataset.splits.items() for r in records}
    added, removed = len(set(new) - set(old)), len(set(old) - set(new))
    changed = sum(1 for k in set(new) & set(old) if old[k] is not None and old[k] != new[k])
    what = ", ".join(f"{n} {w}" for n, w in ((added, "record(s) added"), (removed, "removed"),
                                            (changed, "relabelled or moved to another split")) if n)
    raise DataError(f"{output}: a stale prepared copy: the raw dataset {raw_root} changed since it was prepared "
                    f"({what or 'image files modified (size or modification time)'}); prepare into a new --output, "
                    "or delete this folder and prepare again")


def _summary(meta: dict, output: str, written: bool, seconds: float) -> dict:
    return {"dataset": meta["dataset"], "output": output, "written": written,
            "images": {s: len(rows) for s, rows in meta["splits"].items()}, "skipped": len(meta.get("skipped", [])),
            "bytes": meta["bytes"], "source_bytes": meta["source"]["bytes"],
            "ratio": round(meta["bytes"] / max(meta["source"]["bytes"], 1), 4), "digest": meta["digest"],
            "seconds": round(seconds, 1)}


def prepare(name: str, raw_root: str, output: str, *, max_size: int = DEFAULT_MAX_SIZE, resize: str = "square",
            image_format: str = "raw", quality: int = 95, workers: int = 1, options: dict | None = None,
            skip_bad_images: bool = False, allow_outside_root: bool = False, chunk_size: int = CHUNK,
            progress: bool | None = None) -> dict:
    """Prepares dataset `name` read from `raw_root` into `output` (see the module docstring); returns a summary
    {'dataset', 'output', 'written' (False: it was already there), 'images' per split, 'skipped', 'bytes' (the
    ArrayRecord files), 'source_bytes' (the raw images), 'ratio', 'digest', 'seconds'}. Raises DataError on bad
    input, leaving nothing of this run behind."""
    start = time.perf_counter()
    if name not in data.READERS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(data.READERS)}")
    if image_format not in FORMATS:
        raise DataError(f"--format {image_format!r}: expected one of {', '.join(FORMATS)}")
    if max_size < 1:
        raise DataError(f"--max-size {max_size}: expected a positive number of pixels")
    if resize not in RESIZE_MODES:
        raise DataError(f"--resize {resize!r}: expected one of {', '.join(RESIZE_MODES)}")
    if not 1 <= quality <= 100:
        raise DataError(f"--quality {quality}: expected 1-100")
    options = dict(options or {})
    raw_root = os.path.abspath(os.path.expanduser(raw_root))
    output = os.path.abspath(os.path.expanduser(output))
    if prepared.is_prepared(raw_root):
        raise DataError(f"--root {raw_root} is itself a prepared dataset; prepare from the raw files")
    request = _request(name, take_options(data._READERS[name][1], options, name), max_size, resize, image_format,
                       quality)
    done = _check_output(output, raw_root, request)
    if done is not None:
        _check_fresh(done, name, raw_root, output, options, allow_outside_root)
        log.info("%s already holds this prepared dataset", output)
        return _summary(done, output, False, time.perf_counter() - start)
    created = not os.path.exists(output)
    partial = os.path.join(output, PARTIAL)
    try:
        os.makedirs(partial, exist_ok=True)
        meta = _prepare(name, raw_root, output, partial, request, options, skip_bad_images, allow_outside_root,
                        workers, chunk_size, progress)
    except DataError:
        _clean_output(output, created)
        raise
    shutil.rmtree(partial, ignore_errors=True)
    return _summary(meta, output, True, time.perf_counter() - start)


def _convert_all(dataset: Dataset, items: list, partial: str, request: dict, workers: int, chunk_size: int,
                 progress: bool | None) -> list[str]:
    """Stage 1: converts every item into chunk files under partial/chunks (missing chunks only); returns their
    paths in order."""
    chunks_dir = os.path.join(partial, "chunks")
    fingerprint = hashlib.sha256(json.dumps(
        [request, chunk_size, [[s, _stored_path(dataset, r.path), _label_json(r.label), r.patient, _stamp(r.path)]
                               for s, _, r in items]]).encode()).hexdigest()
    plan_path = os.path.join(partial, "plan.json")
    try:
        with open(plan_path) as f:
            same = json.load(f).get("fingerprint") == fingerprint
    except (OSError, ValueError):
        same = False
    if not same:
        if os.path.isdir(chunks_dir):
            log.info("%s: an earlier prepare of other files or options was interrupted here; starting over", partial)
        shutil.rmtree(chunks_dir, ignore_errors=True)
        os.makedirs(chunks_dir)
        with atomic_write(plan_path) as f:
            json.dump({"fingerprint": fingerprint}, f)
    paths = [os.path.join(chunks_dir, f"{k:07d}.pkl") for k in range(-(-len(items) // chunk_size))]
    todo = [k for k, p in enumerate(paths) if not os.path.isfile(p)]
    size = lambda k: min(chunk_size, len(items) - k * chunk_size)  # noqa: E731
    args = [(paths[k], [r.path for _, _, r in items[k * chunk_size:(k + 1) * chunk_size]], dataset.channels,
             request["max_size"], request["format"], request["quality"] or 95, request["resize"]) for k in todo]
    bar = tqdm(total=len(items), initial=len(items) - sum(size(k) for k in todo), unit="img", file=sys.stderr,
               desc=f"prepare {dataset.name}", disable=None if progress is None else not progress)
    done = 0
    with bar:
        if workers <= 1 or len(args) <= 1:
            for k, a in zip(todo, args):
                convert_chunk(*a)
                bar.update(size(k))
                done += 1
                _maybe_kill("chunk", done)
        else:
            ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
            with concurrent.futures.ProcessPoolExecutor(min(workers, len(args)), mp_context=ctx,
                                                        initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
                futures = {pool.submit(convert_chunk, *a): k for k, a in zip(todo, args)}
                for future in concurrent.futures.as_completed(futures):
                    future.result()
                    bar.update(size(futures[future]))
                    done += 1
                    _maybe_kill("chunk", done)
    return paths


def _prepare(name, raw_root, output, partial, request, options, skip_bad_images, allow_outside_root, workers,
             chunk_size, progress) -> dict:
    dataset = data.get_dataset(name, raw_root, workdir=partial, check_images="exists",
                               skip_bad_images=skip_bad_images, allow_outside_root=allow_outside_root, **options)
    items = [(split, i, r) for split, records in dataset.splits.items() for i, r in enumerate(records)]
    _say(f"{name}: {len(items)} images listed in {raw_root}; decoding and resizing them ...")
    chunk_paths = _convert_all(dataset, items, partial, request, workers, chunk_size, progress)

    # The converted images, checked: every bad image at once, or left out with skip_bad_images.
    results, bad = [], []
    for path in chunk_paths:
        results.extend(_read_chunk(path))
    for (split, i, r), (ok, payload, *_) in zip(items, results):
        if not ok:
            bad.append((r, payload))
    if bad and not skip_bad_images:
        listed = "; ".join(f"{r.path} ({r.origin}): {why}" for r, why in bad[:MAX_LISTED])
        more = f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise DataError(f"{len(bad)} of {len(items)} images cannot be read: {listed}{more}. Fix or remove them, or "
                        "pass --skip-bad-images to prepare without them (they are listed in the prepared metadata)")
    keep = {split: [] for split in dataset.splits}  # split -> [(record, result)]
    for (split, _, r), result in zip(items, results):
        if result[0]:
            keep[split].append((r, result))
    skipped = list(dataset.skipped) + [(r.path, r.origin, why) for r, why in bad]
    if not keep.get("train"):
        raise DataError(f"{raw_root}: every training image was skipped as unreadable; nothing to prepare")
    keep = {s: v for s, v in keep.items() if v}
    dataset.splits = {s: [r for r, _ in v] for s, v in keep.items()}

    # Stage 2: the TFDS ArrayRecord dataset, written from the chunks, then the metadata, last.
    import tensorflow_datasets as tfds

    digests: dict[str, list[bytes]] = {s: [] for s in keep}
    written = [0]

    def examples(split):
        for index, (r, (_, image, _, _)) in enumerate(keep[split]):
            rel = _stored_path(dataset, r.path)
            label = _label_json(r.label)
            digests[split].append(prepared.record_digest(split, index, image, label, r.patient or "", rel))
            written[0] += 1
            _maybe_kill("example", written[0])
            yield index, {"image": image, "label": label, "patient": r.patient or "", "path": rel}

    builder_root = os.path.join(output, prepared.BUILDER_NAME)
    shutil.rmtree(builder_root, ignore_errors=True)  # a TFDS folder without metadata is from a killed run
    description = (f"medjax prepared {name} from {raw_root}: images decoded as medjax decodes them, resized as the "
                   f"loader resizes them ({request['resize']}, {request['max_size']} px, bilinear) when that makes "
                   f"them smaller, stored as {request['format']}")
    builder = _builder_class()(dataset=dataset, image_format=request["format"], description=description,
                               examples=examples, data_dir=output, file_format="array_record")
    tfds.disable_progress_bar()
    _say(f"writing {sum(len(v) for v in keep.values())} images as TFDS ArrayRecord files to {builder_root} ...")
    with contextlib.redirect_stdout(sys.stderr):  # TFDS prints its progress; stdout is the summary's
        builder.download_and_prepare(download_dir=os.path.join(partial, "downloads"))
    builder_dir = os.path.relpath(str(builder.data_dir), output).replace(os.sep, "/")
    for split, v in keep.items():  # read back: every split complete, in order
        source = prepared.open_split(os.path.join(output, builder_dir), split)
        if len(source) != len(v):
            raise RuntimeError(f"{builder_dir}: split {split} holds {len(source)} records, {len(v)} written")
    files = {}
    for folder, _, names in os.walk(os.path.join(output, builder_dir)):
        for fname in sorted(names):
            full = os.path.join(folder, fname)
            files[os.path.relpath(full, output).replace(os.sep, "/")] = {
                "bytes": os.path.getsize(full), "sha256": file_sha256(full)}
    source_bytes = sum(os.path.getsize(p) for p in {r.path for r, _ in sum(keep.values(), [])} if os.path.isfile(p))
    digest = hashlib.sha256(b"".join(d for s in keep for d in digests[s])).hexdigest()
    rel = functools.partial(_stored_path, dataset)
    meta = {
        "format": prepared.FORMAT, "version": prepared.VERSION, "dataset": name, "task": dataset.task,
        "class_names": dataset.class_names, "channels": dataset.channels, "target_metric": dataset.target_metric,
        "statistics": {"mean": list(dataset.mean), "std": list(dataset.std), "source": dataset.statistics_source},
        "options": request["options"],
        "image": {"max_size": request["max_size"], "resize": request["resize"], "format": request["format"],
                  "quality": request["quality"], "dtype": "uint8", "layout": "HWC" if dataset.channels > 1 else "HW",
                  "rule": RULE[request["resize"]]},
        "source": {"root": raw_root, "bytes": source_bytes,
                   "fingerprint": source_fingerprint(_raw_records(name, raw_root, options, allow_outside_root))},
        "tfds": {"builder_dir": builder_dir, "files": files},
        "bytes": sum(f["bytes"] for f in files.values()),
        "digest": digest,
        "splits": {s: [[rel(r.path), _label_json(r.label), r.patient, r.origin, list(res[2]), list(res[3])]
                       for r, res in v] for s, v in keep.items()},
        "skipped": [[rel(p), o, why] for p, o, why in skipped],
        "excluded": [[rel(p), o, why] for p, o, why in dataset.excluded],
    }
    meta = json.loads(json.dumps(meta))
    meta[prepared.DIGEST_KEY] = prepared.metadata_digest(meta)  # any later edit of the records is refused on open
    tmp = os.path.join(partial, prepared.METADATA + ".tmp")
    with atomic_write(tmp, "w") as f:
        json.dump(meta, f, separators=(",", ":"))
    _maybe_kill("metadata")
    os.replace(tmp, os.path.join(output, prepared.METADATA))
    return meta
