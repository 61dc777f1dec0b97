"""medjax.data: the study's four datasets and a user's own, read in their public layouts, split reproducibly and fed
as grain batches.

    dataset = medjax.data.get_dataset("chexpert", "/data/CheXpert-v1.0-small", workdir="/tmp/run")
    for batch in medjax.data.make_loader(dataset, "train", batch_size=64, train=True, seed=0):
        batch["image"]  # float32 (64, 224, 224, 1), normalised NHWC; batch["label"], batch["mask"]

Data flows one way: files -> `Record`s (one module per dataset) -> splits (`splits.py`) -> grain transforms
(`transforms.py`) -> batches (`pipeline.py`). `python -m medjax.data fake|describe` writes synthetic data in a
public layout and prints what a reader sees.
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Callable

from medjax.data import aptos2019, cbis_ddsm, chexpert, ddsm, generic, isic2019
from medjax.data.records import DataError, Dataset, Record, allow_outside_root as _allow_outside_root, check_inside_root
from medjax.data.splits import write_split_file

__all__ = ["READERS", "DataError", "Dataset", "Record", "describe", "get_dataset", "make_loader", "num_batches"]
log = logging.getLogger(__name__)

# Dataset readers by name: each takes the dataset root and keyword options and returns a split `Dataset`.
READERS: dict[str, Callable[..., Dataset]] = {
    "chexpert": chexpert.read,
    "ddsm": ddsm.read,
    "cbis_ddsm": cbis_ddsm.read,
    "isic2019": isic2019.read,
    "aptos2019": aptos2019.read,
    "csv": generic.read_csv_dataset,
    "folder": generic.read_folder,
}
CHECKS = ("none", "exists", "decode")


def _check_images(dataset: Dataset, check: str) -> None:
    """Finds listed images that are missing (check 'exists') or unreadable ('decode'); raises on the first, or with
    skip_bad_images removes them all and lists them in `dataset.skipped`."""
    if check == "none":
        return
    decode = None
    if check == "decode":
        from medjax.data.transforms import decode
    for split, records in dataset.splits.items():
        kept = []
        for r in records:
            reason = None
            if not os.path.isfile(r.path):
                reason = "file not found"
            elif decode is not None:
                try:
                    decode(r.path, dataset.channels)
                except Exception as e:  # noqa: BLE001 - reported with the file and row
                    reason = f"cannot decode ({type(e).__name__}: {e})"
            if reason is None:
                kept.append(r)
            elif dataset.skip_bad_images:
                dataset.skipped.append((r.path, r.origin, reason))
            else:
                raise DataError(f"{r.path} ({r.origin}): {reason}. Fix the file or the list, or pass "
                                "skip_bad_images=True to skip and count bad images.")
        dataset.splits[split] = kept
    if dataset.skipped:
        log.warning("%s: skipped %d bad image(s), first: %s (%s): %s", dataset.name, len(dataset.skipped),
                    *dataset.skipped[0])


def get_dataset(name: str, root: str, *, workdir: str | None = None, skip_bad_images: bool = False,
                check_images: str = "exists", allow_outside_root: bool = False, **options) -> Dataset:
    """Reads dataset `name` from `root` in its public layout and splits it.

    name: one of READERS ('chexpert', 'ddsm', 'cbis_ddsm', 'isic2019', 'aptos2019', 'csv', 'folder'); each reader's
    docstring gives the layout, the split rule and its options, e.g. `seed` (split seed), CheXpert's
    `uncertain='zeros'|'ones'`, `frontal_only`, `use_valid_as_test`.
    workdir: if given, the splits are written to `<workdir>/splits/<name>.json` (image paths relative to root).
    check_images: 'exists' (default: every listed image must exist), 'decode' (and decode; slow) or 'none'.
    skip_bad_images: instead of raising on a missing or unreadable image, leave it out and list it in
    `Dataset.skipped` (logged, and in the split file); at load time an unreadable image becomes a mask=False row.
    allow_outside_root: accept image paths in data files that are absolute or hold '..' (refused by default: they
    would read outside the dataset root). Symlinked folders inside the root are always allowed.
    Raises DataError naming the file (and row) on bad input.
    """
    if name not in READERS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(READERS)}")
    if check_images not in CHECKS:
        raise DataError(f"check_images={check_images!r}: expected one of {CHECKS}")
    reader = READERS[name]
    accepted = [p for p in inspect.signature(reader).parameters if p != "root"]
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise DataError(f"dataset {name!r} has no option {unknown[0]!r}; its options: {', '.join(accepted)}")
    root = os.path.abspath(os.path.expanduser(root))
    with _allow_outside_root(allow_outside_root):
        dataset = reader(root, **options)
        check_inside_root(dataset)
    if not dataset.splits.get("train"):
        raise DataError(f"{root}: no training images were read for dataset {name!r}; expected its files in the "
                        f"layout of `medjax.data.{reader.__module__.rsplit('.', 1)[-1]}`")
    dataset.skip_bad_images = skip_bad_images
    _check_images(dataset, check_images)
    if workdir:
        dataset.split_file = write_split_file(dataset, workdir)
    return dataset


def describe(dataset: Dataset) -> dict:
    """{'dataset': name, 'splits': {split: {'images': N, 'labels': {class: count}, 'patients': N or None}}}; label
    counts are positives per class for multi-label sets; patients is None when the dataset has no patient ids."""
    out = {}
    for split, records in dataset.splits.items():
        counts = [0] * dataset.num_classes
        for r in records:
            if isinstance(r.label, tuple):
                counts = [c + v for c, v in zip(counts, r.label)]
            else:
                counts[r.label] += 1
        patients = {r.patient for r in records if r.patient is not None}
        out[split] = {"images": len(records), "labels": dict(zip(dataset.class_names, counts)),
                      "patients": len(patients) if patients else None}
    return {"dataset": dataset.name, "splits": out}


def __getattr__(name):  # grain is imported only when a loader is made (describe/fake stay fast)
    if name in ("make_loader", "num_batches"):
        from medjax.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
