"""CheXpert v1.0-small (Kaggle `ashery/chexpert`): 14 findings, multi-label, grayscale chest X-rays.

Layout: `root` is the `CheXpert-v1.0-small` folder holding `train.csv` and `valid.csv`; their `Path` values start
with `CheXpert-v1.0-small/` (the folder itself), e.g. `CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`.
Label cells are 1.0 (positive), 0.0 (negative), -1.0 (uncertain) or empty (not mentioned).

Split (reference study): rows sorted by `Path`; patients taken in that order fill val until it holds >= 10% of the
images, then test (>= 10%); the rest is train. Patient-disjoint by construction. The reference rule needs no seed;
`shuffle_patients=True` permutes the patients with `seed` first. `use_valid_as_test=True` makes `valid.csv` the test
split and train.csv gives only val and train.
"""

from __future__ import annotations

import os
import re

from medjax.data.records import DataError, Dataset, Record, fill_splits, join_under, read_csv, require_dir, take_options
from medjax.data.splits import check_disjoint, split_by_group

CLASS_NAMES = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
               "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
               "Fracture", "Support Devices"]
MEAN, STD = (0.503,), (0.292,)
_VALUES = {"1": 1, "1.0": 1, "0": 0, "0.0": 0, "-1": -1, "-1.0": -1, "": None}
_PATIENT = re.compile(r"(patient\d+)")


def decode_labels(cells: list[str], uncertain: str, origin: str) -> tuple[int, ...]:
    """CSV cells of the 14 findings -> multi-hot. Empty -> 0; -1 -> 0 (U-Zeroes) or 1 (U-Ones); a row without any
    positive gets 'No Finding' = 1."""
    out = []
    for name, cell in zip(CLASS_NAMES, cells):
        if cell not in _VALUES:
            raise DataError(f"{origin}: column '{name}' holds {cell!r}; expected 1.0, 0.0, -1.0 or empty")
        v = _VALUES[cell]
        out.append(1 if v == 1 or (v == -1 and uncertain == "ones") else 0)
    if not any(out):
        out[0] = 1
    return tuple(out)


def _image_path(root: str, value: str, origin: str) -> str:
    parts = value.replace("\\", "/").split("/")
    if parts[0].lower().startswith("chexpert-v1.0"):  # the Path column names the root folder itself
        parts = parts[1:]
    return join_under(root, "/".join(parts), origin, "column 'Path'")


def _read(root: str, csv_name: str, uncertain: str, frontal_only: bool) -> list[Record]:
    required = ["Path", *CLASS_NAMES] + (["Frontal/Lateral"] if frontal_only else [])
    records = []
    for origin, row in read_csv(os.path.join(root, csv_name), required, "CheXpert's csv with a Path column"):
        if frontal_only and row["Frontal/Lateral"].lower() != "frontal":
            continue
        m = _PATIENT.search(row["Path"])
        if not m:
            raise DataError(f"{origin}: Path {row['Path']!r} has no patientNNNNN component")
        records.append(Record(_image_path(root, row["Path"], origin), decode_labels([row[c] for c in CLASS_NAMES],
                                                                             uncertain, origin),
                              m.group(1), origin))
    return sorted(records, key=lambda r: r.path)


OPTIONS = {
    "uncertain": ("zeros", "uncertain (-1) labels: 'zeros' (U-Zeroes, the reference) or 'ones' (U-Ones)"),
    "frontal_only": (False, "keep frontal views only (Frontal/Lateral column)"),
    "use_valid_as_test": (False, "valid.csv is the test split; train.csv gives train and val"),
    "seed": (0, "split seed (used only with shuffle_patients)"),
    "shuffle_patients": (False, "permute the patients with seed before the path-ordered split"),
    "val_fraction": (0.1, "fraction of images in val"),
    "test_fraction": (0.1, "fraction of images in test (ignored with use_valid_as_test)"),
}


def read(root: str, **options) -> Dataset:
    """Reads CheXpert (see the module docstring and OPTIONS)."""
    o = take_options(OPTIONS, options, "chexpert")
    uncertain, frontal_only, use_valid_as_test = o["uncertain"], o["frontal_only"], o["use_valid_as_test"]
    seed, val_fraction, test_fraction = o["seed"], o["val_fraction"], o["test_fraction"]
    require_dir(root, "the CheXpert-v1.0-small folder holding train.csv")
    if uncertain not in ("zeros", "ones"):
        raise DataError(f"uncertain={uncertain!r}: expected 'zeros' (U-Zeroes) or 'ones' (U-Ones)")
    records = _read(root, "train.csv", uncertain, frontal_only)
    fractions = {"val": val_fraction} if use_valid_as_test else {"val": val_fraction, "test": test_fraction}
    splits = split_by_group(records, fractions, seed if o["shuffle_patients"] else None)
    if use_valid_as_test:
        splits["test"] = _read(root, "valid.csv", uncertain, frontal_only)
    check_disjoint(splits, os.path.join(root, "train.csv"))
    return fill_splits(Dataset("chexpert", "multilabel", list(CLASS_NAMES), 1, "mean_auc", MEAN, STD, splits,
                               root=root, options=o))
