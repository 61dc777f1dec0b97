"""medjax.data: the study's four datasets, the companion studies' six (NIH ChestX-ray14, pediatric pneumonia,
HAM10000, ISIC 2018, iChallenge-AMD, Figshare brain tumour) and a user's own, read in their public layouts, checked,
split reproducibly and fed as grain batches.

    dataset = medjax.data.get_dataset("chexpert", "/data/CheXpert-v1.0-small", workdir="/tmp/run")
    for batch in medjax.data.make_loader(dataset, "train", batch_size=64, train=True, seed=0):
        batch["image"]  # float32 (64, 224, 224, 1), normalised NHWC; batch["label"], batch["mask"]

Data flows one way: files -> `Record`s (one module per dataset) -> splits (`splits.py`) -> grain transforms
(`transforms.py`) -> batches (`pipeline.py`). `python -m medjax.data fake|describe|options` writes synthetic data
in a public layout, prints what a reader sees, and lists the data options (`OPTIONS`).

For the trainer: `Dataset.skipped_images` (every image left out, at start-up or while loading), `OPTIONS`
({dataset: {option: (default, help)}}), `fake.write_once` (atomic synthetic data) and `DataError` (bad user data,
one line naming the file, row or option).
"""

from __future__ import annotations

import logging
import os
from typing import Callable

from medjax import rundir
from medjax.data import (
    aptos2019,
    brain_tumor_figshare,
    cbis_ddsm,
    checks,
    chest_xray_pneumonia,
    chexpert,
    ddsm,
    generic,
    ham10000,
    ichallenge_amd,
    isic2018,
    isic2019,
    nih_chestxray14,
    prepared,
    statistics,
    volumes,
)
from medjax.data.records import DataError, Dataset, Record, check_inside_root, fill_splits
from medjax.data.records import allow_outside_root as _allow_outside_root
from medjax.data.splits import write_split_file

__all__ = ["OPTIONS", "READERS", "DataError", "Dataset", "Record", "describe", "get_dataset", "make_loader",
           "num_batches"]
log = logging.getLogger(__name__)

# Dataset readers by name: each takes the dataset root and its keyword options and returns a split `Dataset`;
# each declares its options, {option: (default, one-line help)}, in one place beside the reader.
_READERS: dict[str, tuple[Callable[..., Dataset], dict]] = {
    "chexpert": (chexpert.read, chexpert.OPTIONS),
    "ddsm": (ddsm.read, ddsm.OPTIONS),
    "cbis_ddsm": (cbis_ddsm.read, cbis_ddsm.OPTIONS),
    "isic2019": (isic2019.read, isic2019.OPTIONS),
    "aptos2019": (aptos2019.read, aptos2019.OPTIONS),
    "nih_chestxray14": (nih_chestxray14.read, nih_chestxray14.OPTIONS),
    "chest_xray_pneumonia": (chest_xray_pneumonia.read, chest_xray_pneumonia.OPTIONS),
    "ham10000": (ham10000.read, ham10000.OPTIONS),
    "isic2018": (isic2018.read, isic2018.OPTIONS),
    "ichallenge_amd": (ichallenge_amd.read, ichallenge_amd.OPTIONS),
    "brain_tumor_figshare": (brain_tumor_figshare.read, brain_tumor_figshare.OPTIONS),
    "volumes": (volumes.read, volumes.OPTIONS),  # 3-D studies: a record is a volume
    "csv": (generic.read_csv_dataset, generic.CSV_OPTIONS),
    "folder": (generic.read_folder, generic.FOLDER_OPTIONS),
}
READERS: dict[str, Callable[..., Dataset]] = {name: read for name, (read, _) in _READERS.items()}
CHECKS = checks.LEVELS
# Options of get_dataset itself, valid for every dataset.
COMMON_OPTIONS = {
    "check_images": ("verify", "start-up image check: 'verify' (intact: PNG checksums, others decoded), 'decode', "
                               "'exists' or 'none'; cached in the work directory"),
    "skip_bad_images": (False, "leave missing or unreadable images out (listed in the split file and metrics) "
                               "instead of stopping at start-up"),
    "allow_outside_root": (False, ("accept image paths that are absolute or contain '..', or symlinks leading out "
                                   "of the root (refused by default)")),
    "jpeg_draft": (True, "decode a JPEG at least twice the resize target at 1/2, 1/4 or 1/8 scale in the DCT "
                         "(Pillow draft): several times cheaper, within a few grey levels of a full decode "
                         "(docs/data.md)"),
}
# The data options (config.data_options) each dataset accepts: {dataset: {option: (default, one-line help)}}.
OPTIONS: dict[str, dict[str, tuple]] = {name: {**declared, **COMMON_OPTIONS}
                                        for name, (_, declared) in _READERS.items()}
MAX_LISTED = 20  # bad images named in the start-up error; describe --skip-bad-images lists them all


def _check_images(dataset: Dataset, level: str, workdir: str | None) -> Callable[[], None]:
    """Checks every image of every split at `level` (see `medjax.data.checks`). Bad images stop the start with one
    DataError naming all of them (up to MAX_LISTED), or with skip_bad_images are left out and listed in
    `dataset.skipped`. Returns the function that writes the check cache, to call once the dataset is accepted."""
    records = [r for recs in dataset.splits.values() for r in recs]
    cache = rundir.split_file(workdir, dataset.name, "checked.json") if workdir else None
    result = checks.find_bad_images(records, level, dataset.channels, root=dataset.root, cache_path=cache)
    if result.bad and not dataset.skip_bad_images:
        listed = "; ".join(f"{r.path} ({r.origin}): {why}" for r, why in result.bad[:MAX_LISTED])
        more = f"; and {len(result.bad) - MAX_LISTED} more" if len(result.bad) > MAX_LISTED else ""
        raise DataError(f"{len(result.bad)} of {len(records)} images cannot be read ({level} check): {listed}{more}. "
                        "Fix or remove them, or pass skip_bad_images=True to train without them (they are then "
                        "listed in the split file and the run's metrics)")
    if result.bad:
        bad = {id(r) for r, _ in result.bad}
        dataset.skipped.extend((r.path, r.origin, why) for r, why in result.bad)
        dataset.splits = {s: [r for r in recs if id(r) not in bad] for s, recs in dataset.splits.items()}
        log.warning("%s: skipped %d bad image(s) of %d, first: %s (%s): %s", dataset.name, len(result.bad),
                    len(records), *dataset.skipped[0])
    if cache and result.checked:
        return lambda: checks.save_check_cache(cache, level, result.good)
    return lambda: None


def get_dataset(name: str, root: str, *, workdir: str | None = None, skip_bad_images: bool = False,
                check_images: str = "verify", allow_outside_root: bool = False, jpeg_draft: bool = True,
                **options) -> Dataset:
    """Reads dataset `name` from `root` in its public layout and splits it, or opens `root` as a prepared dataset
    (`python -m medjax.data prepare`, detected by its `medjax_prepared.json`; see `medjax.data.prepared`): then the
    splits and labels are those of the prepare run, `name` must be the prepared dataset's and the reader options
    the prepared ones, and the loader reads the stored images.

    name: one of READERS ('chexpert', 'ddsm', 'cbis_ddsm', 'isic2019', 'aptos2019', 'csv', 'folder'); each reader's
    docstring gives the layout, the split rule and its options, e.g. `seed` (split seed), CheXpert's
    `uncertain='zeros'|'ones'`, `frontal_only`, `use_valid_as_test`.
    workdir: if given, the splits are written to `<workdir>/splits/<name>.json` (image paths relative to root).
    check_images: 'verify' (default: every image exists and is intact: PNG checksums, other formats decoded; cached
    in the work directory so that a resume does not check unchanged files again), 'decode' (every image decoded
    by the loader's decoder), 'exists' or 'none'. All bad images are reported at once (see `medjax.data.checks`).
    skip_bad_images: instead of stopping on missing or unreadable images, leave them out and list them in
    `Dataset.skipped` (logged, and in the split file). An image that cannot be read later, while loading, never
    stops a run: it becomes a mask=False row and is listed too. `Dataset.skipped_images` has them all.
    allow_outside_root: accept image paths in data files that are absolute or hold '..' (refused by default: they
    would read outside the dataset root), and symlinks inside the root that lead out of it (refused by default;
    symlinks that stay inside the root are always allowed).
    jpeg_draft: the loader decodes a JPEG of at least twice its resize target at a reduced DCT scale (`decode`).
    A prepared root: check_images 'exists' / 'verify' check its ArrayRecord files (present / size and SHA-256 as
    written), 'decode' also decodes every stored image.
    Raises DataError naming the file (and row) on bad input.
    """
    if name not in READERS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(READERS)}")
    if check_images not in CHECKS:
        raise DataError(f"check_images={check_images!r}: expected one of {CHECKS}")
    reader = READERS[name]
    accepted = list(OPTIONS[name])
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise DataError(f"dataset {name!r} has no option {unknown[0]!r}; its options: {', '.join(accepted)}")
    root = os.path.abspath(os.path.expanduser(root))
    if prepared.is_prepared(root):
        dataset = prepared.load(name, root, options, _READERS[name][1], check_images=check_images,
                                skip_bad_images=skip_bad_images, workdir=workdir)
        save_check_cache = lambda: None  # noqa: E731 - the prepared check keeps its own cache
    else:
        with _allow_outside_root(allow_outside_root):
            dataset = reader(root, **options)
            check_inside_root(dataset)
        if not dataset.splits.get("train"):
            raise DataError(f"{root}: no training images were read for dataset {name!r}; expected its files in the "
                            f"layout of `medjax.data.{reader.__module__.rsplit('.', 1)[-1]}`, or a prepared "
                            f"dataset ({prepared.METADATA})")
        dataset.skip_bad_images = skip_bad_images
        # a volume is no image: its reader checks that it exists; its slices are read (named on failure) when embedded
        save_check_cache = _check_images(dataset, "none" if name == volumes.NAME else check_images, workdir)
    dataset.jpeg_draft = bool(jpeg_draft)
    empty = [s for s in ("train",) if not dataset.splits.get(s)]
    if empty:
        raise DataError(f"{root}: every training image was skipped as unreadable ({len(dataset.skipped)} images, "
                        f"first {dataset.skipped[0][0]}: {dataset.skipped[0][2]}); nothing to train on")
    fill_splits(dataset)
    if dataset.mean is None or dataset.std is None:
        dataset.mean, dataset.std, dataset.statistics_source = statistics.compute(dataset, workdir)
    if workdir:
        dataset.split_file = write_split_file(dataset, workdir)
        save_check_cache()
        dataset.failure_log = rundir.split_file(workdir, dataset.name, "skipped_while_loading.jsonl")
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
