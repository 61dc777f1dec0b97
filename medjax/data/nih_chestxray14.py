"""NIH ChestX-ray14 as NIH (Box) and Kaggle (`nih-chest-xrays/data`) ship it: 14 findings, multi-label, grayscale.

Layout: `root/Data_Entry_2017.csv` (or `Data_Entry_2017_v2020.csv`; columns `Image Index`, `Finding Labels` joined
by `|`, `Patient ID`, ...), the official lists `root/train_val_list.txt` and `root/test_list.txt` (one image file
name per line), and the PNGs in `root/images/` (NIH's archives) or `root/images_001/images/` ...
`root/images_012/images/` (Kaggle). Labels are the 14 findings; "No Finding" is the empty set, or a 15th column
with `no_finding_class=True` (as the radiology study's label binarizer kept it).

Split: test = `test_list.txt`. Validation comes out of `train_val_list.txt`, patient-disjoint:
`val_rule='seeded'` (default) draws whole patients with `seed` until val holds `val_fraction` of the images;
`val_rule='last'` takes the last `val_images` images of the list (the radiology study's last 10,002), extended
backwards to whole patients. Images of a test patient found in train_val_list (not the case in the official
lists) are excluded and listed; rows in neither list are excluded and listed.
"""

from __future__ import annotations

import os
import re

from medjax.data.records import (
    DataError,
    Dataset,
    Record,
    fill_splits,
    list_entries,
    read_csv,
    require_dir,
    take_options,
)
from medjax.data.splits import check_disjoint, split_by_group

FINDINGS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
            "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]
NO_FINDING = "No Finding"
ENTRY_FILES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
COLUMNS = ["Image Index", "Finding Labels", "Patient ID"]
OPTIONS = {
    "no_finding_class": (False, "add 'No Finding' as a 15th label column (the radiology study's binarizer)"),
    "val_rule": ("seeded", "'seeded': whole patients drawn with seed; 'last': the last val_images of "
                           "train_val_list.txt, extended to whole patients (the radiology study)"),
    "val_fraction": (0.1, "fraction of train_val images in val (val_rule='seeded')"),
    "val_images": (10002, "number of images at the end of train_val_list.txt in val (val_rule='last')"),
    "seed": (0, "split seed (val_rule='seeded')"),
}
_NAME = re.compile(r"^[^/\\]+\.png$", re.IGNORECASE)


def image_folders(root: str) -> list[str]:
    """root/images and root/images_NNN/images (or root/images_NNN holding the PNGs directly), in name order."""
    folders = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not os.path.isdir(path) or not re.fullmatch(r"images(_\d+)?", name, re.IGNORECASE):
            continue
        inner = os.path.join(path, "images")
        folders.append(inner if os.path.isdir(inner) else path)
    return folders


def index_images(folders: list[str]) -> dict[str, str]:
    """File name -> path for the PNGs of the folders (the first folder wins on a duplicate name)."""
    found: dict[str, str] = {}
    for folder in folders:
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.lower().endswith(".png"):
                    found.setdefault(entry.name, os.path.join(folder, entry.name))
    return found


def labels_of(cell: str, origin: str, no_finding_class: bool) -> tuple[int, ...]:
    names = [n.strip() for n in cell.split("|") if n.strip()]
    unknown = [n for n in names if n not in FINDINGS and n != NO_FINDING]
    if unknown or not names:
        raise DataError(f"{origin}: Finding Labels {cell!r}: expected '{NO_FINDING}' or findings joined by '|' "
                        f"from {', '.join(FINDINGS)}")
    if NO_FINDING in names and len(names) > 1:
        raise DataError(f"{origin}: Finding Labels {cell!r} has '{NO_FINDING}' together with findings")
    hot = [int(f in names) for f in FINDINGS]
    return tuple(hot + [int(not any(hot))]) if no_finding_class else tuple(hot)


def _read_list(path: str) -> list[tuple[str, str]]:
    """(image name, origin) per non-empty line of an official list."""
    entries = list_entries(path, "the official list of image file names")
    for name, origin in entries:
        if not _NAME.match(name):
            raise DataError(f"{origin}: {name!r} is not an image file name (NNNNNNNN_NNN.png) without folders")
    return entries


def _val_last(records: list[Record], val_images: int) -> dict[str, list[Record]]:
    if val_images <= 0:
        return {"train": list(records), "val": []}
    cut = max(0, len(records) - val_images)
    while cut > 0 and records[cut - 1].patient == records[cut].patient:
        cut -= 1  # whole patients: the study's cut could split one
    return {"train": records[:cut], "val": records[cut:]}


def read(root: str, **options) -> Dataset:
    """Reads NIH ChestX-ray14 (see the module docstring and OPTIONS)."""
    o = take_options(OPTIONS, options, "nih_chestxray14")
    require_dir(root, "the ChestX-ray14 folder holding Data_Entry_2017.csv, the lists and images/")
    if o["val_rule"] not in ("seeded", "last"):
        raise DataError(f"val_rule={o['val_rule']!r}: expected 'seeded' or 'last'")
    entry = next((os.path.join(root, f) for f in ENTRY_FILES if os.path.isfile(os.path.join(root, f))),
                 os.path.join(root, ENTRY_FILES[0]))
    folders = image_folders(root)
    if not folders:
        raise DataError(f"{root}: no images/ or images_001/images/ ... folder; expected the ChestX-ray14 PNGs there")
    found = index_images(folders)
    rows: dict[str, tuple[tuple[int, ...], str, str]] = {}
    for origin, row in read_csv(entry, COLUMNS, "the ChestX-ray14 Data_Entry CSV"):
        name = row["Image Index"]
        if not _NAME.match(name):
            raise DataError(f"{origin}: Image Index {name!r} is not an image file name without folders")
        if not row["Patient ID"]:
            raise DataError(f"{origin}: Patient ID is empty")
        if name in rows:
            raise DataError(f"{origin}: image {name} appears twice (first: {rows[name][2]})")
        rows[name] = (labels_of(row["Finding Labels"], origin, o["no_finding_class"]), row["Patient ID"], origin)

    def record(name: str, list_origin: str) -> Record:
        if name not in rows:
            raise DataError(f"{list_origin}: image {name} has no row in {os.path.basename(entry)}")
        label, patient, origin = rows[name]
        return Record(found.get(name, os.path.join(folders[0], name)), label, patient, origin)

    lists = {s: _read_list(os.path.join(root, f"{s}_list.txt")) for s in ("train_val", "test")}
    test = [record(n, origin) for n, origin in lists["test"]]
    test_patients = {r.patient for r in test}
    listed = {n for items in lists.values() for n, _ in items}
    excluded = [(os.path.join(folders[0], n), origin, "in neither train_val_list.txt nor test_list.txt")
                for n, (_, _, origin) in rows.items() if n not in listed]
    train_val = []
    for name, list_origin in lists["train_val"]:
        r = record(name, list_origin)
        if r.patient in test_patients:
            excluded.append((r.path, r.origin, f"patient {r.patient} is also in test_list.txt"))
        else:
            train_val.append(r)
    if o["val_rule"] == "last":
        splits = _val_last(train_val, o["val_images"])
    else:
        splits = split_by_group(train_val, {"val": o["val_fraction"]}, o["seed"])
    splits["test"] = test
    check_disjoint(splits, root)
    names = FINDINGS + [NO_FINDING] if o["no_finding_class"] else list(FINDINGS)
    return fill_splits(Dataset("nih_chestxray14", "multilabel", names, 1, "mean_auc", None, None, splits, root=root,
                               options=o, excluded=excluded))
