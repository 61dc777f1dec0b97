"""ISIC 2019 training set: dermoscopy, 8 diagnostic classes, RGB.

Layout: `root/ISIC_2019_Training_GroundTruth.csv` (columns image, MEL, NV, BCC, AK, BKL, DF, VASC, SCC, UNK; one-hot
1.0/0.0), optional `root/ISIC_2019_Training_Metadata.csv` (image, age_approx, anatom_site_general, lesion_id, sex)
and images `root/ISIC_2019_Training_Input/ISIC_2019_Training_Input/<image>.jpg` (the Kaggle double folder; a single
`ISIC_2019_Training_Input/` level is accepted too). UNK has no training images and is not a class.

Split: seeded 80/10/10 (val, test, then train). ISIC has no patient ids; when the metadata is present, images of the
same `lesion_id` are kept in one split (`group_by_lesion=True`, default) since they are photos of one lesion.
"""

from __future__ import annotations

import os

from medjax.data.records import DataError, Dataset, Record, fill_splits, join_under, read_csv, require_dir, take_options
from medjax.data.splits import split_by_group

CLASS_NAMES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
MEAN, STD = (0.6678, 0.5296, 0.5243), (0.2238, 0.2036, 0.2154)
GROUND_TRUTH = "ISIC_2019_Training_GroundTruth.csv"
METADATA = "ISIC_2019_Training_Metadata.csv"
IMAGES = "ISIC_2019_Training_Input"


def label_of(row: dict, origin: str) -> int:
    """One-hot cells -> class index; exactly one of the 8 classes must be 1."""
    try:
        values = [float(row[c] or 0) for c in CLASS_NAMES + ["UNK"]]
    except ValueError:
        raise DataError(f"{origin}: class cells must be 0 or 1, got {[row[c] for c in CLASS_NAMES]}") from None
    hot = [c for c, v in zip(CLASS_NAMES + ["UNK"], values) if v == 1]
    if hot == ["UNK"]:
        raise DataError(f"{origin}: image {row['image']} is labelled UNK, which is not one of the 8 classes")
    if len(hot) != 1 or any(v not in (0, 1) for v in values):
        raise DataError(f"{origin}: expected exactly one class set to 1, got "
                        f"{dict(zip(CLASS_NAMES, [row[c] for c in CLASS_NAMES]))}")
    return CLASS_NAMES.index(hot[0])


OPTIONS = {
    "seed": (0, "split seed"),
    "val_fraction": (0.1, "fraction of images in val"),
    "test_fraction": (0.1, "fraction of images in test"),
    "group_by_lesion": (True, "keep the images of one lesion_id (metadata CSV) in one split"),
}


def read(root: str, **options) -> Dataset:
    """Reads ISIC 2019 (see the module docstring and OPTIONS)."""
    o = take_options(OPTIONS, options, "isic2019")
    seed, val_fraction, test_fraction, group_by_lesion = (o[k] for k in OPTIONS)
    require_dir(root, f"the ISIC 2019 folder holding {GROUND_TRUTH} and {IMAGES}/")
    images = os.path.join(root, IMAGES, IMAGES)
    if not os.path.isdir(images) and os.path.isdir(os.path.join(root, IMAGES)):
        images = os.path.join(root, IMAGES)
    columns = ["image", *CLASS_NAMES]
    records = [Record(join_under(images, row["image"] + ".jpg", origin, "column 'image'"), label_of(row, origin), None,
                      origin)
               for origin, row in read_csv(os.path.join(root, GROUND_TRUTH), columns, "the ISIC 2019 ground truth")]
    lesion = {}
    if group_by_lesion and os.path.exists(os.path.join(root, METADATA)):
        for origin, row in read_csv(os.path.join(root, METADATA), ["image", "lesion_id"], "the ISIC 2019 metadata"):
            if row["lesion_id"]:
                lesion[join_under(images, row["image"] + ".jpg", origin, "column 'image'")] = row["lesion_id"]
    splits = split_by_group(records, {"val": val_fraction, "test": test_fraction}, seed,
                            key=lambda r: lesion.get(r.path, r.path))
    return fill_splits(Dataset("isic2019", "multiclass", list(CLASS_NAMES), 3, "balanced_accuracy", MEAN, STD,
                               splits, root=root, options=o))
