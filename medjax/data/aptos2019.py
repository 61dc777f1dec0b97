"""APTOS 2019 blindness detection: retina photographs, 5 diabetic-retinopathy grades, RGB.

Layout: `root/train_1.csv` (columns id_code, diagnosis in 0..4) and images `root/train_images/train_images/<id>.png`
(the Kaggle double folder; a single `train_images/` level is accepted too).

Split: seeded 70/15/15 (val, test, then train) over images; APTOS has no patient ids.
"""

from __future__ import annotations

import os

from medjax.data.records import DataError, Dataset, Record, fill_splits, join_under, read_csv, require_dir, take_options
from medjax.data.splits import split_by_group

CLASS_NAMES = ["No DR", "Mild", "Moderate", "Severe", "Proliferative DR"]
MEAN, STD = (0.415, 0.221, 0.073), (0.275, 0.150, 0.081)


def label_of(value: str, origin: str) -> int:
    try:
        grade = float(value)
    except ValueError:
        grade = -1.0
    if not grade.is_integer() or not 0 <= grade < len(CLASS_NAMES):
        raise DataError(f"{origin}: diagnosis {value!r} is not a grade 0-4 ({', '.join(CLASS_NAMES)})")
    return int(grade)


OPTIONS = {
    "seed": (0, "split seed"),
    "val_fraction": (0.15, "fraction of images in val"),
    "test_fraction": (0.15, "fraction of images in test"),
}


def read(root: str, **options) -> Dataset:
    """Reads APTOS 2019 (see the module docstring and OPTIONS)."""
    o = take_options(OPTIONS, options, "aptos2019")
    require_dir(root, "the APTOS 2019 folder holding train_1.csv and train_images/")
    images = os.path.join(root, "train_images", "train_images")
    if not os.path.isdir(images) and os.path.isdir(os.path.join(root, "train_images")):
        images = os.path.join(root, "train_images")
    records = [Record(join_under(images, row["id_code"] + ".png", origin, "column 'id_code'"),
                      label_of(row["diagnosis"], origin), None, origin)
               for origin, row in read_csv(os.path.join(root, "train_1.csv"), ["id_code", "diagnosis"],
                                           "the APTOS 2019 label CSV")]
    splits = split_by_group(records, {"val": o["val_fraction"], "test": o["test_fraction"]}, o["seed"])
    return fill_splits(Dataset("aptos2019", "multiclass", list(CLASS_NAMES), 3, "quadratic_kappa", MEAN, STD, splits,
                               root=root, options=o))
