"""Pediatric chest X-ray pneumonia (Kermany et al.; Kaggle `paultimothymooney/chest-xray-pneumonia`), grayscale.

Layout: `root/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg`; `root` may also be the folder holding `chest_xray/`
(the Kaggle archive nests it, with a `__MACOSX/` copy that is ignored). Pneumonia files are named
`personN_bacteria_M.jpeg` / `personN_virus_M.jpeg`; normal ones `IM-NNNN-NNNN.jpeg`, `NORMAL2-IM-NNNN-NNNN.jpeg`.

Patients: `personN` for pneumonia files, `IM-NNNN` / `NORMAL2-IM-NNNN` for normal ones; a file name that follows
neither pattern is its own patient. Classes: 2 (normal, pneumonia) or, with `classes=3`, normal, bacterial, viral
from the file names.

Split: the official test folder is the test split. The official val folder holds 16 images, so val is drawn again:
whole patients of train + val, seeded, until it holds `val_fraction` (20%) of them; the rest is train. (The glioma
study split its train folder 80/20 at random by image, which lets a patient's images straddle train and val.)
Train/val images of a patient who is also in the test folder are excluded and listed, so the splits are
patient-disjoint.
"""

from __future__ import annotations

import os
import re

from medjax.data.records import IMAGE_EXTENSIONS, DataError, Dataset, Record, fill_splits, require_dir, take_options
from medjax.data.splits import check_disjoint, split_by_group

OPTIONS = {
    "classes": (2, "2: normal, pneumonia; 3: normal, bacterial, viral (from the file names)"),
    "val_fraction": (0.2, "fraction of train + val images (whole patients) in val"),
    "seed": (0, "split seed"),
}
FOLDERS = ("NORMAL", "PNEUMONIA")
_PNEUMONIA = re.compile(r"^(person\d+)_(bacteria|virus)_\d+", re.IGNORECASE)
_NORMAL = re.compile(r"^((?:NORMAL\d*-)?IM-\d+)-\d+", re.IGNORECASE)


def dataset_root(root: str) -> str:
    """The folder holding train/ and test/: `root` itself or `root/chest_xray` (the Kaggle nesting)."""
    for candidate in (root, os.path.join(root, "chest_xray"), os.path.join(root, "chest_xray", "chest_xray")):
        if os.path.isdir(os.path.join(candidate, "train")) and os.path.isdir(os.path.join(candidate, "test")):
            return candidate
    raise DataError(f"{root}: no train/ and test/ folders (also looked in chest_xray/); expected "
                    "chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg")


def label_of(folder: str, file_name: str, classes: int, origin: str) -> tuple[int, str]:
    """(label, patient) of one file."""
    stem = os.path.splitext(file_name)[0]
    if folder == "NORMAL":
        m = _NORMAL.match(stem)
        return 0, (m.group(1) if m else stem)
    m = _PNEUMONIA.match(stem)
    if classes == 3 and not m:
        raise DataError(f"{origin}: file name {file_name!r} says neither bacteria nor virus "
                        "(personN_bacteria_M / personN_virus_M), so it has no 3-class label")
    label = 1 if classes == 2 else (1 if m.group(2).lower() == "bacteria" else 2)
    return label, (m.group(1).lower() if m else stem)


def read(root: str, **options) -> Dataset:
    """Reads the pediatric pneumonia set (see the module docstring and OPTIONS)."""
    o = take_options(OPTIONS, options, "chest_xray_pneumonia")
    require_dir(root, "the chest_xray folder holding train/, val/ and test/")
    if o["classes"] not in (2, 3):
        raise DataError(f"classes={o['classes']}: expected 2 (normal, pneumonia) or 3 (normal, bacterial, viral)")
    base = dataset_root(root)
    by_split: dict[str, list[Record]] = {"train": [], "val": [], "test": []}
    for split in by_split:
        split_dir = os.path.join(base, split)
        if not os.path.isdir(split_dir):
            continue
        for folder in sorted(os.listdir(split_dir)):
            path = os.path.join(split_dir, folder)
            if folder.startswith(".") or not os.path.isdir(path):
                continue
            if folder.upper() not in FOLDERS:
                raise DataError(f"{path}: folder {folder!r} is not a class of this dataset; expected "
                                f"{' and '.join(FOLDERS)}")
            for name in sorted(os.listdir(path)):
                if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                origin = f"{path}/"
                label, patient = label_of(folder.upper(), name, o["classes"], f"{os.path.join(path, name)}")
                by_split[split].append(Record(os.path.join(path, name), label, f"{folder.upper()}/{patient}",
                                              origin))
    if not by_split["test"]:
        raise DataError(f"{os.path.join(base, 'test')}: no images; expected test/NORMAL/*.jpeg and "
                        "test/PNEUMONIA/*.jpeg")
    test_patients = {r.patient for r in by_split["test"]}
    pool = by_split["train"] + by_split["val"]
    excluded = [(r.path, r.origin, f"patient {r.patient} is also in the test folder")
                for r in pool if r.patient in test_patients]
    pool = [r for r in pool if r.patient not in test_patients]
    splits = split_by_group(pool, {"val": o["val_fraction"]}, o["seed"])
    splits["test"] = by_split["test"]
    check_disjoint(splits, base)
    names = ["normal", "pneumonia"] if o["classes"] == 2 else ["normal", "bacterial", "viral"]
    return fill_splits(Dataset("chest_xray_pneumonia", "multiclass", names, 1,
                               "roc_auc" if o["classes"] == 2 else "balanced_accuracy", None, None, splits,
                               root=root, options=o, excluded=excluded))
