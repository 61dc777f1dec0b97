"""ISIC 2018 Task 3 (lesion diagnosis): dermoscopy, 7 classes, RGB; the training set is HAM10000.

Layout (as the challenge archives unpack, each CSV either in its folder or directly in `root`):
- `ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv`: `image`, one-hot `MEL, NV, BCC,
  AKIEC, BKL, DF, VASC` (1.0 / 0.0); images `ISIC2018_Task3_Training_Input/<image>.jpg`.
- optional `ISIC2018_Task3_Training_LesionGroupings.csv` (`image`, `lesion_id`): splits drawn from the training
  set keep a lesion's images together.
- optional official validation and test sets: `ISIC2018_Task3_{Validation,Test}_GroundTruth/...GroundTruth.csv`
  with `ISIC2018_Task3_{Validation,Test}_Input/`.

Split: the official validation and test sets where their ground truth is present; a missing one is drawn from the
training set instead, seeded and lesion-disjoint (`val_fraction`, `test_fraction`).
"""

from __future__ import annotations

import os

from medjax.data.ham10000 import MEAN, STD, checked_id, index_images
from medjax.data.records import DataError, Dataset, Record, fill_splits, read_csv, require_dir, take_options
from medjax.data.splits import check_disjoint, split_by_group

CLASS_NAMES = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
PREFIX = "ISIC2018_Task3_"
SETS = {"train": "Training", "val": "Validation", "test": "Test"}
GROUPINGS = PREFIX + "Training_LesionGroupings.csv"
OPTIONS = {
    "seed": (0, "seed of the splits drawn from the training set"),
    "val_fraction": (0.1, "fraction of training images in val when the official validation set is absent"),
    "test_fraction": (0.1, "fraction of training images in test when the official test set is absent"),
    "official_splits": (True, "use the official validation/test sets where present"),
}


def _find(root: str, folder: str, name: str) -> str | None:
    for path in (os.path.join(root, folder, name), os.path.join(root, name)):
        if os.path.isfile(path):
            return path
    return None


def label_of(row: dict, origin: str) -> int:
    try:
        values = [float(row[c] or 0) for c in CLASS_NAMES]
    except ValueError:
        values = []
    if len(values) != len(CLASS_NAMES) or any(v not in (0, 1) for v in values) or sum(values) != 1:
        raise DataError(f"{origin}: expected exactly one of {', '.join(CLASS_NAMES)} set to 1 (the others 0), got "
                        f"{dict((c, row[c]) for c in CLASS_NAMES)}")
    return values.index(1)


def _read_set(root: str, split: str, required: bool) -> list[Record] | None:
    name = f"{PREFIX}{SETS[split]}_GroundTruth"
    csv_path = _find(root, name, name + ".csv")
    if csv_path is None:
        if required:
            raise DataError(f"{os.path.join(root, name, name + '.csv')}: file not found; expected the ISIC 2018 "
                            "Task 3 training ground truth")
        return None
    inputs = os.path.join(root, f"{PREFIX}{SETS[split]}_Input")
    nested = os.path.join(inputs, os.path.basename(inputs))
    inputs = nested if os.path.isdir(nested) else inputs
    found = index_images([inputs]) if os.path.isdir(inputs) else {}
    records, seen = [], {}
    for origin, row in read_csv(csv_path, ["image", *CLASS_NAMES], "an ISIC 2018 Task 3 ground-truth CSV"):
        image = checked_id(row["image"], origin, "image")
        if image in seen:
            raise DataError(f"{origin}: image {image} appears twice (first: {seen[image]})")
        seen[image] = origin
        records.append(Record(found.get(image, os.path.join(inputs, image + ".jpg")), label_of(row, origin), None,
                              origin))
    return records


def read(root: str, **options) -> Dataset:
    """Reads ISIC 2018 Task 3 (see the module docstring and OPTIONS)."""
    o = take_options(OPTIONS, options, "isic2018")
    require_dir(root, f"the ISIC 2018 folder holding {PREFIX}Training_GroundTruth/ and {PREFIX}Training_Input/")
    train = _read_set(root, "train", True)
    lesion = {}
    groupings = _find(root, f"{PREFIX}Training_GroundTruth", GROUPINGS)
    if groupings:
        for origin, row in read_csv(groupings, ["image", "lesion_id"], "the ISIC 2018 lesion groupings"):
            lesion[row["image"]] = row["lesion_id"]
    train = [Record(r.path, r.label, lesion.get(os.path.splitext(os.path.basename(r.path))[0]), r.origin)
             for r in train]
    official = {s: _read_set(root, s, False) if o["official_splits"] else None for s in ("val", "test")}
    drawn = {s: o[f"{s}_fraction"] for s in ("val", "test") if official[s] is None}
    splits = split_by_group(train, drawn, o["seed"], key=lambda r: r.patient or r.path)
    for s, records in official.items():
        if records is not None:
            splits[s] = records
    check_disjoint(splits, root)
    return fill_splits(Dataset("isic2018", "multiclass", list(CLASS_NAMES), 3, "balanced_accuracy", MEAN, STD,
                               splits, root=root, options={**o, "official": [s for s in official if official[s]]}))
