"""Records and datasets: what every reader returns, the errors readers raise, and small helpers they share.

A reader turns files in a public layout into a `Dataset`: named classes, statistics and a list of `Record`s per
split. Nothing here decodes pixels; that happens in `transforms.py`, inside the loader.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Iterator, Sequence

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")


class DataError(ValueError):
    """Bad input data: the message names the file (and row) and says what was expected."""


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
    channels: 1 (grayscale) or 3. mean/std: per-channel statistics of pixel values in [0, 1] (SPEC section 5).
    splits: 'train', 'val', 'test' (only those the dataset has) -> records in a fixed order.
    skipped: (path, origin, reason) of every image left out by `skip_bad_images=True`.
    excluded: (path, origin, reason) of records a split rule removed (e.g. a CBIS-DDSM train image of a test
    patient), so that nothing is dropped silently.
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

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise DataError(f"{path}: {'not a folder' if os.path.exists(path) else 'does not exist'}; expected {what}")
    return path


def require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found; expected {what}")
    return path


def read_csv(path: str, required: Sequence[str] = (), what: str = "") -> Iterator[tuple[str, dict[str, str]]]:
    """Yields (origin, row) for each data row of a CSV; origin is 'FILE line N' (N counts physical lines)."""
    require_file(path, what or "a CSV file")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = columns
        missing = [c for c in required if c not in columns]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(map(repr, missing))}; "
                            f"found {', '.join(map(repr, columns)) or 'no header'}")
        for row in reader:
            yield f"{path} line {reader.line_num}", {k: (v or "").strip() for k, v in row.items() if k is not None}


def fill_splits(dataset: Dataset, order: Sequence[str] = ("train", "val", "test")) -> Dataset:
    """Drops empty splits and orders the rest train, val, test."""
    dataset.splits = {s: dataset.splits[s] for s in order if dataset.splits.get(s)}
    return dataset
