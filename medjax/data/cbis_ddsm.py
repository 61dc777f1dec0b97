"""CBIS-DDSM as published by TCIA: DICOM mammograms with mass/calcification description CSVs; benign vs malignant.

Layout: `root` holds the description CSVs (`mass_case_description_{train,test}_set.csv`,
`calc_case_description_{train,test}_set.csv`) and the DICOM tree as the NBIA Data Retriever writes it, either
directly or under `root/CBIS-DDSM/`: one folder per full mammogram, e.g. `Mass-Training_P_00001_LEFT_CC/`, holding
one `.dcm` somewhere below it. The CSVs' `image file path` uses UIDs that the retriever's folder names do not, so
the image is found by the first path component (the series folder); the exact CSV path is used when it exists.

Labels: one record per mammogram (patient, breast side, view, official split); it is malignant (1) if any of its
abnormalities has pathology MALIGNANT, else benign (0) (BENIGN and BENIGN_WITHOUT_CALLBACK).

Split: the official train/test sets; val takes patients from train (sorted ids permuted with `seed`) until it
holds >= `val_fraction` of the train images. Patient-disjoint: train images of a patient who is also in the
official test set are excluded (listed in `Dataset.excluded` and the split file), the test set stays official.
"""

from __future__ import annotations

import logging
import os

from medjax.data.records import DataError, Dataset, Record, fill_splits, join_under, read_csv, require_dir, take_options
from medjax.data.splits import check_disjoint, split_by_group

CLASS_NAMES = ["benign", "malignant"]
MEAN, STD = (0.286,), (0.267,)  # the DDSM statistics of the reference code
PATHOLOGY = {"MALIGNANT": 1, "BENIGN": 0, "BENIGN_WITHOUT_CALLBACK": 0}
CSV_FILES = {("mass", "train"): "mass_case_description_train_set.csv",
             ("mass", "test"): "mass_case_description_test_set.csv",
             ("calc", "train"): "calc_case_description_train_set.csv",
             ("calc", "test"): "calc_case_description_test_set.csv"}
COLUMNS = ["patient_id", "left or right breast", "image view", "pathology", "image file path"]
log = logging.getLogger(__name__)


def _find_dicom(dicom_root: str, value: str, origin: str) -> str:
    value = value.strip().replace("\\", "/")
    exact = join_under(dicom_root, value, origin, "column 'image file path'")  # refuses '..' before any walk
    if os.path.isfile(exact):
        return exact
    folder = os.path.join(dicom_root, value.split("/")[0])
    found = sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.lower().endswith(".dcm"))
    if len(found) > 1:
        full = [f for f in found if "full mammogram" in f.lower()]
        found = full if len(full) == 1 else found
    if len(found) > 1:
        raise DataError(f"{folder}: {len(found)} DICOM files where one full mammogram was expected: {found[:3]}")
    return found[0] if found else exact


OPTIONS = {
    "abnormality": ("both", "'both', 'mass' or 'calc': which description CSVs to read"),
    "seed": (0, "seed of the val patients drawn from the official train set"),
    "val_fraction": (0.1, "fraction of the train images moved to val (whole patients)"),
}


def read(root: str, **options) -> Dataset:
    """Reads the official CBIS-DDSM (see the module docstring and OPTIONS)."""
    o = take_options(OPTIONS, options, "cbis_ddsm")
    abnormality = o["abnormality"]
    require_dir(root, "the CBIS-DDSM folder holding the case description CSVs and the DICOM tree")
    if abnormality not in ("both", "mass", "calc"):
        raise DataError(f"abnormality={abnormality!r}: expected 'both', 'mass' or 'calc'")
    dicom_root = os.path.join(root, "CBIS-DDSM") if os.path.isdir(os.path.join(root, "CBIS-DDSM")) else root
    kinds = ("mass", "calc") if abnormality == "both" else (abnormality,)
    images: dict[tuple, dict] = {}  # (split, patient, side, view) -> {path, label, origin}
    for kind in kinds:
        for split in ("train", "test"):
            csv_path = os.path.join(root, CSV_FILES[kind, split])
            for origin, row in read_csv(csv_path, COLUMNS, f"the TCIA {kind} case description CSV",
                                        require_rows=False):
                pathology = row["pathology"].upper()
                if pathology not in PATHOLOGY:
                    raise DataError(f"{origin}: pathology {row['pathology']!r} is not one of {sorted(PATHOLOGY)}")
                key = (split, row["patient_id"], row["left or right breast"].upper(), row["image view"].upper())
                if key not in images:
                    images[key] = {"path": _find_dicom(dicom_root, row["image file path"], origin), "label": 0,
                                   "origin": origin}
                images[key]["label"] = max(images[key]["label"], PATHOLOGY[pathology])
    by_split = {"train": [], "test": []}
    for (split, patient, _, _), v in images.items():
        by_split[split].append(Record(v["path"], v["label"], patient, v["origin"]))
    if not by_split["train"]:
        raise DataError(f"{root}: the {' and '.join(CSV_FILES[k, 'train'] for k in kinds)} list no image; expected "
                        "one row per abnormality of the training set")
    test_patients = {r.patient for r in by_split["test"]}
    excluded = [(r.path, r.origin, f"patient {r.patient} is also in the official test set")
                for r in by_split["train"] if r.patient in test_patients]
    if excluded:
        log.warning("cbis_ddsm: %d train images of %d patients who are also in the official test set are excluded",
                    len(excluded), len({r.patient for r in by_split['train'] if r.patient in test_patients}))
    train = [r for r in by_split["train"] if r.patient not in test_patients]
    splits = split_by_group(train, {"val": o["val_fraction"]}, o["seed"])
    splits["test"] = by_split["test"]
    check_disjoint(splits, root)
    return fill_splits(Dataset("cbis_ddsm", "multiclass", list(CLASS_NAMES), 1, "roc_auc", MEAN, STD, splits,
                               root=root, options=o,
                               excluded=excluded))
