"""HAM10000 (Tschandl et al.; Harvard Dataverse, Kaggle `kmader/skin-cancer-mnist-ham10000`): dermoscopy, 7 classes.

Layout: `root/HAM10000_metadata.csv` (columns `lesion_id`, `image_id`, `dx`, `dx_type`, `age`, `sex`,
`localization`, ...) and the JPEGs `<image_id>.jpg` in `root/HAM10000_images_part_1/` and `_part_2/` (Kaggle also
ships lower-case `ham10000_images_part_*` copies; Dataverse's `HAM10000_images_part1`/`part2` folder names and
images directly in `root` are found as well).

Classes: the `dx` codes in the ISIC 2018 order: mel, nv, bcc, akiec, bkl, df, vasc.
Split: lesion-disjoint (one lesion has up to six images), seeded 80/10/10 over lesions (val, test, then train).
A record's `patient` is its `lesion_id`, the group that splits keep together.
Statistics: the per-channel mean/std commonly used for HAM10000.
"""

from __future__ import annotations

import os
import re

from medjax.data.records import DataError, Dataset, Record, fill_splits, read_csv, require_dir, take_options
from medjax.data.splits import check_disjoint, split_by_group

CLASS_NAMES = ["mel", "nv", "bcc", "akiec", "bkl", "df", "vasc"]
MEAN, STD = (0.7630, 0.5456, 0.5700), (0.1409, 0.1526, 0.1700)
METADATA = "HAM10000_metadata.csv"
OPTIONS = {
    "seed": (0, "split seed (over lesions)"),
    "val_fraction": (0.1, "fraction of images in val (whole lesions)"),
    "test_fraction": (0.1, "fraction of images in test (whole lesions)"),
}
_ID = re.compile(r"^[A-Za-z0-9_\-]+$")


def index_images(folders: list[str]) -> dict[str, str]:
    """Image id (file name without .jpg) -> path, the first folder winning on duplicates."""
    found: dict[str, str] = {}
    for folder in folders:
        with os.scandir(folder) as it:
            for entry in it:
                stem, ext = os.path.splitext(entry.name)
                if ext.lower() in (".jpg", ".jpeg", ".png") and not entry.name.startswith("."):
                    found.setdefault(stem, os.path.join(folder, entry.name))
    return found


def image_folders(root: str, pattern: str) -> list[str]:
    """Folders of `root` whose name matches `pattern` (case-insensitive), upper-case names first, then root."""
    names = sorted((n for n in os.listdir(root) if re.fullmatch(pattern, n, re.IGNORECASE)
                    and os.path.isdir(os.path.join(root, n))), key=lambda n: (n.islower(), n))
    folders = []
    for n in names:
        inner = os.path.join(root, n, n)  # zip files that unpack into a folder of their own name
        folders.append(inner if os.path.isdir(inner) else os.path.join(root, n))
    return folders + [root]


def checked_id(value: str, origin: str, column: str) -> str:
    if not _ID.match(value):
        raise DataError(f"{origin}: column {column!r} holds {value!r}; expected an image id such as ISIC_0024306 "
                        "(letters, digits, '_' or '-')")
    return value


def read(root: str, **options) -> Dataset:
    """Reads HAM10000 (see the module docstring and OPTIONS)."""
    o = take_options(OPTIONS, options, "ham10000")
    require_dir(root, f"the HAM10000 folder holding {METADATA} and HAM10000_images_part_1/, _part_2/")
    found = index_images(image_folders(root, r"ham10000_images_part_?\d"))
    records, seen = [], {}
    for origin, row in read_csv(os.path.join(root, METADATA), ["lesion_id", "image_id", "dx"],
                                "the HAM10000 metadata CSV"):
        image = checked_id(row["image_id"], origin, "image_id")
        dx = row["dx"].lower()
        if dx not in CLASS_NAMES:
            raise DataError(f"{origin}: dx {row['dx']!r} is not one of the 7 classes {', '.join(CLASS_NAMES)}")
        if image in seen:
            raise DataError(f"{origin}: image_id {image} appears twice (first: {seen[image]})")
        seen[image] = origin
        path = found.get(image, os.path.join(root, "HAM10000_images_part_1", image + ".jpg"))
        records.append(Record(path, CLASS_NAMES.index(dx), row["lesion_id"] or image, origin))
    splits = split_by_group(records, {"val": o["val_fraction"], "test": o["test_fraction"]}, o["seed"])
    check_disjoint(splits, os.path.join(root, METADATA))
    return fill_splits(Dataset("ham10000", "multiclass", list(CLASS_NAMES), 3, "balanced_accuracy", MEAN, STD,
                               splits, root=root, options=o))
