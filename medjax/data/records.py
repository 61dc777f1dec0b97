"""Records and datasets: what every reader returns, the errors readers raise, and small helpers they share.

A reader turns files in a public layout into a `Dataset`: named classes, statistics and a list of `Record`s per
split. Nothing here decodes pixels; that happens in `transforms.py`, inside the loader.
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import dataclasses
import json
import os
import re
from typing import Iterator, Sequence

from medjax.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")


class DataError(UserError):
    """The one exception medjax.data raises for bad user data or options: a missing or unreadable file, a bad or
    empty CSV, a label outside the classes, a path that leaves the dataset root, an unknown option. The message is
    one line that names the file (and row, column or option) and says what was expected; `python -m medjax.data`
    and the trainer print it as `error: MESSAGE` and exit with status 2."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One image of a split.

    path: absolute image path. label: class index (multi-class) or a multi-hot tuple of 0/1 (multi-label).
    patient: patient id where the dataset has one, else None. origin: where the record was read from, for error
    messages ("train.csv line 17").
    """

    path: str
    label: int | tuple[int, ...]
    patient: str | None = None
    origin: str = ""


@dataclasses.dataclass
class Dataset:
    """A dataset read from disk and split.

    task: 'multiclass' (int labels, softmax cross-entropy) or 'multilabel' (multi-hot labels, sigmoid BCE).
    channels: 1 (grayscale) or 3. mean/std: per-channel statistics of pixel values in [0, 1] (SPEC section 5); a
    reader without published ones gives None and get_dataset computes them from the training split
    (`statistics.py`); statistics_source says where they came from.
    splits: 'train', 'val', 'test' (only those the dataset has) -> records in a fixed order.
    skipped: (path, origin, reason) of every image the start-up check left out (`skip_bad_images=True`).
    load_failures: (path, origin, reason) of images that could not be read while loading in this process (they
    became masked rows); `failure_log` (under the work directory) collects them from every process.
    excluded: (path, origin, reason) of records a split rule removed (e.g. a CBIS-DDSM train image of a test
    patient), so that nothing is dropped silently.
    skipped_images: all skipped images, found at start-up or while loading, for the run's report.
    jpeg_draft: the loader decodes large JPEGs at a reduced DCT scale (`transforms.decode`); the data option.
    prepared: for a dataset read from a prepared folder (`prepared.py`), the reader of its stored images
    (`prepared.PreparedImages`); None for files in their public layout.
    """

    name: str
    task: str
    class_names: list[str]
    channels: int
    target_metric: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    splits: dict[str, list[Record]]
    root: str = ""
    options: dict = dataclasses.field(default_factory=dict)
    skipped: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    excluded: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    skip_bad_images: bool = False
    split_file: str | None = None
    load_failures: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    failure_log: str | None = None
    statistics_source: str = "published"
    jpeg_draft: bool = True
    prepared: object = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def relative(self, path: str) -> str:
        """An image path as the split file and reports write it: relative to the root where it lies inside."""
        if self.root and os.path.commonpath([os.path.normpath(self.root), os.path.normpath(path)]) == \
                os.path.normpath(self.root):
            return os.path.relpath(path, self.root)
        return path

    @property
    def skipped_images(self) -> list[dict]:
        """Every image left out of this run, once: [{'image': path relative to the root, 'origin': 'FILE line N',
        'reason': ..., 'found': 'start-up check' | 'loading'}]. The trainer writes it to metrics.json."""
        out, seen = [], set()

        def add(path, origin, reason, found):
            if path not in seen:
                seen.add(path)
                out.append({"image": self.relative(path), "origin": origin, "reason": reason, "found": found})

        for path, origin, reason in self.skipped:
            add(path, origin, reason, "start-up check")
        for path, origin, reason in self.load_failures:
            add(path, origin, reason, "loading")
        if self.failure_log and os.path.isfile(self.failure_log):
            with open(self.failure_log) as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                        add(entry["image"], entry["origin"], entry["reason"], "loading")
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut by a kill
        return out


# Paths read from data files (CSV cells, list files) must stay inside the dataset root unless the user opts in with
# the data option allow_outside_root=True; get_dataset sets this for the duration of a read.
_ALLOW_OUTSIDE_ROOT = contextvars.ContextVar("allow_outside_root", default=False)
_WINDOWS_ABSOLUTE = re.compile(r"^([A-Za-z]:|[\\/]{2})")


@contextlib.contextmanager
def allow_outside_root(allow: bool):
    token = _ALLOW_OUTSIDE_ROOT.set(bool(allow))
    try:
        yield
    finally:
        _ALLOW_OUTSIDE_ROOT.reset(token)


def leaves_root(value: str) -> bool:
    """True for a path read from a data file that is absolute or has a '..' segment ('/' and '\\' both separate)."""
    return (os.path.isabs(value) or value.startswith(("/", "\\")) or bool(_WINDOWS_ABSOLUTE.match(value))
            or ".." in re.split(r"[\\/]", value))


def join_under(root: str, value: str, origin: str, field: str) -> str:
    """`root` joined with a relative path read from a data file (`field` of `origin`, for the message).

    Windows separators are accepted. Refuses an absolute path or a '..' segment, which would read outside the
    dataset root, unless allow_outside_root is on. Symlinks are judged later, by `check_inside_root`: one that
    leads out of the root is refused unless allow_outside_root is on.
    """
    value = value.strip()
    if not value:
        raise DataError(f"{origin}: {field} is empty; expected an image path relative to the dataset root {root}")
    if "\x00" in value:
        raise DataError(f"{origin}: {field} {value!r} holds a NUL byte; expected an image path")
    if leaves_root(value):
        if not _ALLOW_OUTSIDE_ROOT.get():
            raise DataError(f"{origin}: {field} {value!r} leaves the dataset root {root}; expected a path inside it "
                            "(relative, no '..'). Pass the data option allow_outside_root=True to allow such paths")
        if os.path.isabs(value):
            return os.path.normpath(value)
    return os.path.join(root, *[p for p in re.split(r"[\\/]", value) if p not in ("", ".")])


def check_inside_root(dataset: "Dataset") -> None:
    """Every record's path must lie inside dataset.root, judged on the path itself and, for a path that is or lies
    under a symlink, on where the link leads, unless allow_outside_root is on: the last guard behind the readers'
    join_under. Symlinks that stay inside the root are fine."""
    if _ALLOW_OUTSIDE_ROOT.get() or not dataset.root:
        return
    root = os.path.normpath(dataset.root)
    real_root = os.path.realpath(root)
    resolver = _Resolver(root, real_root)
    for records in dataset.splits.values():
        for r in records:
            path = os.path.normpath(r.path)
            if not _under(path, root):
                raise DataError(f"{r.origin}: image {r.path} is outside the dataset root {root}; pass the data "
                                "option allow_outside_root=True to allow it")
            real = resolver.real(path)
            if not _under(real, real_root):
                raise DataError(f"{r.origin}: image {r.path} leads through a symlink to {real}, outside the dataset "
                                f"root {root}; pass the data option allow_outside_root=True to allow such links")


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class _Resolver:
    """realpath() of paths under a root with one lstat per path component not seen before (folders cached); only
    symlinks are resolved: about one more stat per image (20,000 CheXpert-like records: 1.0 s on a loaded shared
    2-core machine where one lstat took 20 us)."""

    def __init__(self, root: str, real_root: str):
        self.dirs = {root: real_root}

    def real(self, path: str) -> str:
        parent, name = os.path.split(path)
        if parent not in self.dirs:
            self.dirs[parent] = self.real(parent)
        full = os.path.join(self.dirs[parent], name)
        return os.path.realpath(full) if os.path.islink(full) else full


def walk_images(folder: str) -> list[str]:
    """Image files below `folder`, sorted, following symlinked sub-folders but walking each real folder once (loops
    cut) and listing each real file once (the first path in sorted order)."""
    out, seen_dirs, seen_files = [], set(), set()
    for d, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        real = os.path.realpath(d)
        if real in seen_dirs:
            dirs[:] = []
            continue
        seen_dirs.add(real)
        out.extend(os.path.join(d, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
    kept = []
    for path in sorted(out):
        real = os.path.realpath(path)
        if real not in seen_files:
            seen_files.add(real)
            kept.append(path)
    return kept


def merge_duplicates(records: list, split_of: list | None = None):
    """(records, split_of, excluded): a path listed twice with the same label (and patient, split) is kept once and
    the repeat listed in `excluded`; with another label, patient or split it is a DataError naming both rows."""
    first: dict[str, int] = {}
    keep, keep_split, excluded = [], [], []
    for i, r in enumerate(records):
        key = os.path.normpath(r.path)
        split = split_of[i] if split_of is not None else None
        if key in first:
            j = first[key]
            other, other_split = records[j], split_of[j] if split_of is not None else None
            if (other.label, other.patient, other_split) != (r.label, r.patient, split):
                raise DataError(f"{r.origin}: image {r.path} is listed again with another label, patient or split "
                                f"than at {other.origin}; expected each image once")
            excluded.append((r.path, r.origin, f"listed again (first at {other.origin}); used once"))
            continue
        first[key] = i
        keep.append(r)
        keep_split.append(split)
    return keep, (keep_split if split_of is not None else None), excluded


Options = dict  # {option: (default, one-line help)}: what a reader declares, in one place
# Numeric ranges of the options several readers share, [low, high) (None: no bound); take_options checks them.
OPTION_RANGES = {"seed": (0, None), "val_fraction": (0, 1), "test_fraction": (0, 1)}


def take_options(declared: Options, given: dict, dataset: str) -> dict:
    """Reader options: `given` checked against `declared` (names, and types where the default has one) and filled
    with the defaults. Raises DataError naming the option."""
    unknown = [k for k in given if k not in declared]
    if unknown:
        raise DataError(f"dataset {dataset!r} has no option {unknown[0]!r}; its options: {', '.join(declared)}")
    out = {}
    for name, (default, _) in declared.items():
        value = given.get(name, default)
        if value is not None and default is not None and value is not default:
            kind = type(default)
            ok = (isinstance(value, bool) if kind is bool else
                  isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
                  isinstance(value, int) and not isinstance(value, bool) if kind is int else
                  isinstance(value, kind))
            if not ok:
                raise DataError(f"dataset {dataset!r} option {name}={value!r}: expected {kind.__name__} "
                                f"(default {default!r})")
        if name in OPTION_RANGES and isinstance(value, (int, float)) and not isinstance(value, bool):
            low, high = OPTION_RANGES[name]
            if value < low or (high is not None and value >= high):
                raise DataError(f"dataset {dataset!r} option {name}={value!r}: expected a number >= {low}"
                                + (f" and < {high}" if high is not None else ""))
        out[name] = value
    return out


def require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise DataError(f"{path}: {'not a folder' if os.path.exists(path) else 'does not exist'}; expected {what}")
    return path


def require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found; expected {what}")
    return path


def read_csv(path: str, required: Sequence[str] = (), what: str = "",
             require_rows: bool = True) -> Iterator[tuple[str, dict[str, str]]]:
    """Yields (origin, row) for each data row of a CSV; origin is 'FILE line N' (N counts physical lines).

    Raises DataError for a missing, empty or non-UTF-8 file, a malformed line, a missing required column and (with
    require_rows) a file that has a header but no data rows.
    """
    require_file(path, what or "a CSV file")
    line = 0
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise DataError(f"{path}: empty file; expected a header row"
                                + (f" with the column(s) {', '.join(map(repr, required))}" if required else "")
                                + " and one row per image")
            columns = [c.strip() for c in reader.fieldnames]
            reader.fieldnames = columns
            missing = [c for c in required if c not in columns]
            if missing:
                raise DataError(f"{path}: missing column(s) {', '.join(map(repr, missing))}; "
                                f"found {', '.join(map(repr, columns)) or 'no header'}")
            rows = 0
            for row in reader:
                line = reader.line_num
                nul = next((k for k, v in row.items() if "\x00" in (v or "") or "\x00" in (k or "")), False)
                if nul is not False:
                    raise DataError(f"{path} line {line}: column {nul!r} holds a NUL byte; expected text")
                if not any((v or "").strip() for k, v in row.items() if k is not None):
                    continue  # a blank line (csv yields those with trailing commas as empty rows)
                rows += 1
                yield f"{path} line {line}", {k: (v or "").strip() for k, v in row.items() if k is not None}
            if require_rows and not rows:
                raise DataError(f"{path}: no data rows, only the header; expected one row per image")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text CSV (undecodable byte at offset {e.start} of a read block, "
                        f"after line {line}); expected {what or 'a CSV file'}") from None
    except csv.Error as e:
        raise DataError(f"{path} line {line + 1}: malformed CSV ({e}); expected {what or 'a CSV file'}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}); expected {what or 'a CSV file'}") from None


def read_lines(path: str, what: str) -> list[str]:
    """The lines of a UTF-8 text file (a split list), or DataError naming the file."""
    require_file(path, what)
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text file (undecodable byte at offset {e.start}); expected {what}") \
            from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}); expected {what}") from None


def list_entries(path: str, what: str) -> list[tuple[str, str]]:
    """(entry, origin 'PATH line N') per non-empty line of a list file (an official split list)."""
    return [(line.strip(), f"{path} line {n}") for n, line in enumerate(read_lines(path, what), 1) if line.strip()]


def fill_splits(dataset: Dataset, order: Sequence[str] = ("train", "val", "test")) -> Dataset:
    """Drops empty splits and orders the rest train, val, test."""
    dataset.splits = {s: dataset.splits[s] for s in order if dataset.splits.get(s)}
    return dataset
