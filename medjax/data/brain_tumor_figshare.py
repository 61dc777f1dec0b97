"""Figshare brain-tumour set (Cheng et al. 2015): 3,064 T1-weighted contrast-enhanced MRI slices of 233 patients,
3 classes (meningioma, glioma, pituitary tumour), grayscale.

Layout: one MATLAB v7.3 (HDF5) file per slice, `<N>.mat`, directly in `root` or spread over the four
`brainTumorDataPublic_*` folders of the download; each holds the struct `cjdata` with `image` (int16, stored
transposed by MATLAB), `label` (1 meningioma, 2 glioma, 3 pituitary), `PID` (patient id as character codes),
`tumorBorder` and `tumorMask`. Optional `cvind.mat` (`cvind`: the fold 1-5 of each slice N, the authors' 5-fold
cross-validation) may sit in `root`.

Split: patient-disjoint, seeded: whole patients fill val, then test (15% each), the rest is train. With
`cv_fold=k`, test is fold k of cvind.mat, val is drawn (whole patients, seeded) from the other folds; slices of a
test patient in the other folds are excluded and listed, so the split stays patient-disjoint.

Intensity: the loader maps each slice's min..max to 0..255 (see `transforms.decode`).
"""

from __future__ import annotations

import os
import re

import numpy as np

from medjax.data.records import (
    DataError,
    Dataset,
    Record,
    fill_splits,
    require_dir,
    take_options,
)
from medjax.data.splits import check_disjoint, split_by_group

CLASS_NAMES = ["meningioma", "glioma", "pituitary"]
OPTIONS = {
    "seed": (0, "split seed"),
    "val_fraction": (0.15, "fraction of slices in val (whole patients)"),
    "test_fraction": (0.15, "fraction of slices in test (whole patients; ignored with cv_fold)"),
    "cv_fold": (None, "1-5: test is this fold of cvind.mat (the authors' 5-fold cross-validation)"),
}
_SLICE = re.compile(r"^(\d+)\.mat$")


def _h5py():
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py is an install requirement
        raise DataError("reading MATLAB v7.3 files needs h5py: pip install h5py") from None
    return h5py


def read_slice(path: str) -> tuple[np.ndarray, int, str]:
    """(image as stored on screen, label 1-3, patient id) of one slice file; DataError naming the file if broken."""
    h5py = _h5py()
    try:
        with h5py.File(path, "r") as f:
            if "cjdata" not in f:
                raise DataError(f"{path}: no 'cjdata' struct; expected a Figshare brain-tumour slice "
                                f"(found {', '.join(f.keys()) or 'nothing'})")
            cj = f["cjdata"]
            missing = [k for k in ("image", "label", "PID") if k not in cj]
            if missing:
                raise DataError(f"{path}: cjdata has no {', '.join(missing)}; expected image, label, PID")
            image = np.asarray(cj["image"][()]).T  # MATLAB is column-major: h5py sees the transpose
            label = np.asarray(cj["label"][()]).ravel()
            pid = "".join(chr(int(c)) for c in np.asarray(cj["PID"][()]).ravel() if int(c)).strip()
    except OSError as e:
        raise DataError(f"{path}: not a MATLAB v7.3 (HDF5) file ({e}); expected a Figshare brain-tumour slice") \
            from None
    if label.size != 1 or label[0] not in (1, 2, 3):
        raise DataError(f"{path}: cjdata.label is {label.tolist()}; expected 1 (meningioma), 2 (glioma) or "
                        "3 (pituitary)")
    if not pid:
        raise DataError(f"{path}: cjdata.PID is empty; expected the patient id")
    return image, int(label[0]), pid


def slice_files(root: str) -> list[tuple[int, str]]:
    """(N, path) of every `<N>.mat` in root and in its brainTumorDataPublic_* folders, by N."""
    folders = [root] + sorted(os.path.join(root, n) for n in os.listdir(root)
                              if n.lower().startswith("braintumordatapublic") and os.path.isdir(os.path.join(root, n)))
    found: dict[int, str] = {}
    for folder in folders:
        for name in os.listdir(folder):
            m = _SLICE.match(name)
            if m:
                n = int(m.group(1))
                if n in found:
                    raise DataError(f"{os.path.join(folder, name)}: slice {n} also at {found[n]}")
                found[n] = os.path.join(folder, name)
    return sorted(found.items())


def read_folds(path: str) -> np.ndarray:
    """cvind.mat's fold per slice (index N-1), from a v7.3 (HDF5) or an older MATLAB file."""
    h5py = _h5py()
    try:
        with h5py.File(path, "r") as f:
            return np.asarray(f["cvind"][()]).ravel().astype(int)
    except (OSError, KeyError):
        pass
    try:
        from scipy.io import loadmat

        return np.asarray(loadmat(path)["cvind"]).ravel().astype(int)
    except Exception as e:  # noqa: BLE001 - reported with the file
        raise DataError(f"{path}: cannot read the variable cvind ({type(e).__name__}: {e}); expected the 5-fold "
                        "index file of the Figshare brain-tumour set") from None


def read(root: str, **options) -> Dataset:
    """Reads the Figshare brain-tumour set (see the module docstring and OPTIONS)."""
    o = take_options(OPTIONS, options, "brain_tumor_figshare")
    require_dir(root, "the folder holding the <N>.mat slices (or the brainTumorDataPublic_* folders)")
    files = slice_files(root)
    if not files:
        raise DataError(f"{root}: no <N>.mat slice files (also looked in brainTumorDataPublic_*/); expected "
                        "1.mat ... 3064.mat")
    records = []
    for n, path in files:
        _, label, pid = read_slice(path)
        records.append(Record(path, label - 1, pid, path))
    excluded = []
    if o["cv_fold"] is not None:
        if o["cv_fold"] not in (1, 2, 3, 4, 5):
            raise DataError(f"cv_fold={o['cv_fold']!r}: expected 1-5 (a fold of cvind.mat) or None")
        cvind = os.path.join(root, "cvind.mat")
        if not os.path.isfile(cvind):
            raise DataError(f"{cvind}: file not found; cv_fold needs the authors' fold file")
        folds = read_folds(cvind)
        numbers = [n for n, _ in files]
        if max(numbers) > len(folds):
            raise DataError(f"{cvind}: holds {len(folds)} folds, but slice {max(numbers)}.mat exists")
        test = [r for n, r in zip(numbers, records) if folds[n - 1] == o["cv_fold"]]
        test_patients = {r.patient for r in test}
        rest = [r for n, r in zip(numbers, records) if folds[n - 1] != o["cv_fold"]]
        excluded = [(r.path, r.origin, f"patient {r.patient} is also in test fold {o['cv_fold']}")
                    for r in rest if r.patient in test_patients]
        splits = split_by_group([r for r in rest if r.patient not in test_patients], {"val": o["val_fraction"]},
                                o["seed"])
        splits["test"] = test
    else:
        splits = split_by_group(records, {"val": o["val_fraction"], "test": o["test_fraction"]}, o["seed"])
    check_disjoint(splits, root)
    return fill_splits(Dataset("brain_tumor_figshare", "multiclass", list(CLASS_NAMES), 1, "balanced_accuracy", None,
                               None, splits, root=root, options=o, excluded=excluded))
