"""iChallenge-AMD training set (Baidu / ISBI 2020 ADAM challenge): 400 fundus photographs, AMD vs non-AMD, RGB.

Layout: `root/Training400/AMD/A*.jpg` and `root/Training400/Non-AMD/N*.jpg`; `root` may be `Training400` itself.
The folder is the label (non-AMD 0, AMD 1). A file whose name contradicts its folder (`A0001.jpg` in `Non-AMD/`)
is an error; other sub-folders holding images are errors too (the archive has only these two).

Split: no patient ids are published, so images are split, seeded 70/15/15 (val, test, then train); with 400
images that leaves 60 test images. (The glioma study split the 400 images 80/20 into train/val at random.)
"""

from __future__ import annotations

import os
import re

from medjax.data.records import IMAGE_EXTENSIONS, DataError, Dataset, Record, fill_splits, require_dir, take_options
from medjax.data.splits import split_by_group

CLASS_NAMES = ["non_amd", "amd"]
FOLDERS = {"non-amd": 0, "amd": 1}
OPTIONS = {
    "seed": (0, "split seed"),
    "val_fraction": (0.15, "fraction of images in val"),
    "test_fraction": (0.15, "fraction of images in test"),
}
_PREFIX = re.compile(r"^([AN])\d+$", re.IGNORECASE)


def read(root: str, **options) -> Dataset:
    """Reads iChallenge-AMD Training400 (see the module docstring and OPTIONS)."""
    o = take_options(OPTIONS, options, "ichallenge_amd")
    require_dir(root, "the folder holding Training400/AMD/ and Training400/Non-AMD/")
    base = os.path.join(root, "Training400") if os.path.isdir(os.path.join(root, "Training400")) else root
    folders = {n.lower(): os.path.join(base, n) for n in os.listdir(base)
               if os.path.isdir(os.path.join(base, n)) and not n.startswith((".", "__MACOSX"))}
    missing = [n for n in ("AMD", "Non-AMD") if n.lower() not in folders]
    if missing:
        raise DataError(f"{base}: no {' or '.join(m + '/' for m in missing)} folder; expected Training400/AMD/A*.jpg "
                        "and Training400/Non-AMD/N*.jpg")
    records = []
    for name, folder in sorted(folders.items()):
        images = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
        if name not in FOLDERS:
            if images:
                raise DataError(f"{folder}: folder {os.path.basename(folder)!r} is not a class; expected AMD/ and "
                                "Non-AMD/ only")
            continue
        label = FOLDERS[name]
        for f in images:
            m = _PREFIX.match(os.path.splitext(f)[0])
            if m and (m.group(1).upper() == "A") != (label == 1):
                raise DataError(f"{os.path.join(folder, f)}: an {'AMD' if m.group(1).upper() == 'A' else 'non-AMD'} "
                                f"file name in the {os.path.basename(folder)}/ folder; the label is unclear")
            records.append(Record(os.path.join(folder, f), label, None, f"{folder}/"))
    splits = split_by_group(records, {"val": o["val_fraction"], "test": o["test_fraction"]}, o["seed"])
    return fill_splits(Dataset("ichallenge_amd", "multiclass", list(CLASS_NAMES), 3, "roc_auc", None, None, splits,
                               root=root, options=o))
