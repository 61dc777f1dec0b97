"""Reproducible, patient-disjoint splits and the split files written to the work directory.

Rule shared by every seeded split: records are grouped by a key (the patient id where the dataset has one, else the
image itself); the distinct keys are sorted, then permuted with `numpy.random.default_rng(seed)` (or kept in their
first-appearance order when seed is None, the CheXpert reference rule); groups are taken in that order to fill the
splits in the order given (val first, then test), each until it holds at least its fraction of the images; the
rest is train. Within a split, records keep the reader's order. A group never crosses splits.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import numpy as np

from medjax import rundir
from medjax.data.records import DataError, Dataset, Record

SPLIT_FILE_VERSION = 1


def split_by_group(records: Sequence[Record], fractions: dict[str, float], seed: int | None,
                   key: Callable[[Record], str] | None = None, rest: str = "train") -> dict[str, list[Record]]:
    """Splits records into `fractions` (e.g. {'val': 0.1, 'test': 0.1}) plus `rest`, never splitting a group.

    key: the group of a record (default: its patient, or its path when it has none). seed None keeps groups in the
    order they first appear in `records` instead of permuting them.
    """
    if sum(fractions.values()) >= 1:
        raise DataError(f"split fractions {fractions} leave nothing for '{rest}'")
    key = key or (lambda r: r.patient if r.patient is not None else r.path)
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(key(r), []).append(i)
    keys = list(groups)
    if seed is not None:
        keys = sorted(keys)
        keys = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
    assignment = {}
    it = iter(keys)
    for split, fraction in fractions.items():
        target, taken = fraction * len(records), 0
        while taken < target - 1e-9:
            k = next(it, None)
            if k is None:
                break
            assignment[k] = split
            taken += len(groups[k])
    for k in it:
        assignment[k] = rest
    out: dict[str, list[Record]] = {s: [] for s in (rest, *fractions)}
    for r in records:
        out[assignment[key(r)]].append(r)
    return out


def check_disjoint(splits: dict[str, list[Record]], what: str) -> None:
    """Raises if any patient appears in two splits (records without a patient id are not checked)."""
    seen: dict[str, str] = {}
    for split, records in splits.items():
        for r in records:
            if r.patient is None:
                continue
            other = seen.setdefault(r.patient, split)
            if other != split:
                raise DataError(f"{what}: patient {r.patient} is in both '{other}' and '{split}' ({r.origin}); "
                                "splits must be patient-disjoint")


def write_split_file(dataset: Dataset, workdir: str) -> str:
    """Writes `<workdir>/splits/<dataset>.json`: options, class names, and per split [image, label, patient] with
    image paths relative to the dataset root, plus the skipped and excluded images with reasons."""
    path = rundir.split_file(workdir, dataset.name)
    os.makedirs(os.path.dirname(path), exist_ok=True)

    def rel(p):
        return os.path.relpath(p, dataset.root) if dataset.root else p

    def label(v):
        return list(v) if isinstance(v, tuple) else v

    content = {
        "version": SPLIT_FILE_VERSION, "dataset": dataset.name, "root": os.path.abspath(dataset.root),
        "options": dataset.options, "task": dataset.task, "class_names": dataset.class_names,
        "statistics": {"mean": list(dataset.mean), "std": list(dataset.std), "source": dataset.statistics_source},
        "counts": {s: len(r) for s, r in dataset.splits.items()},
        "splits": {s: [[rel(r.path), label(r.label), r.patient] for r in recs] for s, recs in dataset.splits.items()},
        "skipped": [{"image": rel(p), "origin": o, "reason": why} for p, o, why in dataset.skipped],
        "excluded": [{"image": rel(p), "origin": o, "reason": why} for p, o, why in dataset.excluded],
    }
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(content, f, indent=1, default=str)
    os.replace(tmp, path)  # atomic: every host of a multi-host job may write the same file
    return path
