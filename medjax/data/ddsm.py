"""DDSM as prepared for the reference study: whole mammograms, normal vs abnormal, grayscale.

Layout: `root/ddsm_raw_image_lists/{train,val,test}.txt` list one image per line, relative to `root/ddsm_raw/`.
The label is the file name's prefix before the first `_`: `normal`, `benign` or `cancer`. Two classes by default:
normal (0) vs benign-or-cancer (1); `num_classes=3` keeps normal, benign, cancer apart.

Split: the fixed lists, as shipped (no seed). A DDSM case id (`A_1234`, volume letter and case number) in the file
name is taken as the patient id, and the lists are checked to be patient-disjoint.
"""

from __future__ import annotations

import os
import re

from medjax.data.records import (
    DataError,
    Dataset,
    Record,
    fill_splits,
    join_under,
    list_entries,
    require_dir,
    take_options,
)
from medjax.data.splits import check_disjoint

MEAN, STD = (0.286,), (0.267,)
PREFIXES = {"normal": 0, "benign": 1, "cancer": 2}
_CASE = re.compile(r"(?<![A-Za-z0-9])([A-D]_\d{4})(?!\d)")


def label_of(file_name: str, num_classes: int, origin: str) -> int:
    prefix = os.path.basename(file_name).split("_")[0].lower()
    if prefix not in PREFIXES:
        raise DataError(f"{origin}: file name {os.path.basename(file_name)!r} does not start with normal_, benign_ "
                        "or cancer_, so it has no label")
    label = PREFIXES[prefix]
    return min(label, 1) if num_classes == 2 else label


OPTIONS = {
    "num_classes": (2, "2: normal vs benign-or-cancer (the reference); 3: normal, benign, cancer"),
    "seed": (None, "unused: the lists fix the split (accepted for a uniform interface)"),
}


def read(root: str, **options) -> Dataset:
    """Reads DDSM from its fixed image lists (see the module docstring and OPTIONS)."""
    o = take_options(OPTIONS, options, "ddsm")
    num_classes = o["num_classes"]
    require_dir(root, "the DDSM folder holding ddsm_raw_image_lists/ and ddsm_raw/")
    lists = require_dir(os.path.join(root, "ddsm_raw_image_lists"), "the lists train.txt, val.txt, test.txt")
    if num_classes not in (2, 3):
        raise DataError(f"num_classes={num_classes}: expected 2 (normal vs benign or cancer) or 3")
    splits = {}
    for split in ("train", "val", "test"):
        path = os.path.join(lists, f"{split}.txt")
        if not os.path.exists(path):
            continue
        records = []
        for name, origin in list_entries(path, "a list of DDSM image file names"):
            case = _CASE.search(os.path.basename(name))
            records.append(Record(join_under(os.path.join(root, "ddsm_raw"), name, origin, "the listed image"),
                                  label_of(name, num_classes, origin), case.group(1) if case else None, origin))
        splits[split] = records
    if "train" not in splits:
        raise DataError(f"{lists}/train.txt: file not found; expected the list of training images")
    if not splits["train"]:
        raise DataError(f"{lists}/train.txt: lists no image; expected one training image file name per line")
    check_disjoint(splits, lists)
    names = ["normal", "benign_or_cancer"] if num_classes == 2 else ["normal", "benign", "cancer"]
    return fill_splits(Dataset("ddsm", "multiclass", names, 1, "roc_auc", MEAN, STD, splits, root=root,
                               options=o))
