"""3-D studies for the slice-wise protocols (the radiology study's CT set): one record per volume, a CSV of volumes.

Layout: `root/volumes.csv` (option `csv`) with the columns `volume` (a path relative to root) and `label` (a class
name), and optionally `patient` and `split` (train / val / test, on every row or none). A volume is
- a folder of 2-D slices (PNG / JPEG / BMP / TIFF, or single-frame DICOM), ordered by the DICOM position along the
  slice normal (ImagePositionPatient projected on the cross product of ImageOrientationPatient's rows), else by
  InstanceNumber, else by file name in natural order (`slice2` before `slice10`);
- a multi-frame DICOM file (the frames in file order);
- a NIfTI file (`.nii` or `.nii.gz`, read with nibabel): the slices along the third voxel axis in index order, each
  `data[:, :, k].T` (rows follow the second voxel axis).

Classes: the labels' names sorted, or `class_names`. Split: the CSV's `split` column, else seeded and
patient-disjoint (`val_fraction`, `test_fraction` of the volumes; a volume without a patient is its own group).

Slices: every slice, or `max_slices` of them: spread evenly over the volume (`slice_sampling='uniform'`: indices
round(linspace(0, S - 1, max_slices))) or the middle ones (`'center'`).
Intensity, one mapping per volume: DICOM values pass the modality LUT first (Hounsfield units for CT); then
`window='C,W'` maps [C - W/2, C + W/2] to 0..255 (e.g. '40,400', CT soft tissue), or by default the volume's own
min..max does. PNG / JPEG slices keep their 8-bit values (16-bit ones are scaled by their bit depth).
Statistics: mean / std of the slices as the model sees them (eval transform) over up to 16 training volumes.

Use: the frozen protocols (`python -m medjax.protocols probe|knn|fewshot --dataset volumes`) embed every slice with
the eval transform, one by one, and average its features per volume (`medjax/protocols/features.py`). Fine-tuning
(`python -m medjax.main` with `dataset="volumes"` and `data_options.max_slices=S`): each row of a batch is S slices of
a volume (`fixed_slices`: a shorter volume repeats slices evenly), each through the train or eval transform, and the
classifier's logits for the volume are the mean of its slices' logits. `python -m medjax.data fake --dataset volumes`
writes synthetic studies in all three forms. A volume that cannot be read stops with a
DataError naming it and its CSV line.
"""

from __future__ import annotations

import os
import re

import numpy as np

from medjax.data.records import (IMAGE_EXTENSIONS, DataError, Dataset, Record, fill_splits, join_under, read_csv,
                                 require_dir, take_options)
from medjax.data.splits import check_disjoint, split_by_group

NAME = "volumes"
OPTIONS = {
    "csv": ("volumes.csv", "the CSV of volumes (columns volume, label[, patient, split]), relative to the root"),
    "class_names": (None, "class names in order (default: the labels found, sorted)"),
    "max_slices": (0, "at most this many slices per volume (0: all)"),
    "slice_sampling": ("uniform", "which slices with max_slices: 'uniform' (evenly spread) or 'center'"),
    "window": (None, "'C,W': map [C - W/2, C + W/2] to 0..255 (CT windows); default: each volume's min..max"),
    "seed": (0, "split seed (when the CSV has no split column)"),
    "val_fraction": (0.15, "fraction of volumes in val (whole patients)"),
    "test_fraction": (0.15, "fraction of volumes in test (whole patients)"),
}
SPLITS = ("train", "val", "test")
NIFTI = (".nii", ".nii.gz")
DICOM = (".dcm", ".dicom")
STATISTICS_VOLUMES = 16


# ------------------------------------------------------------------------------------------------ reading slices


def _natural(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _is_dicom(path: str) -> bool:
    if path.lower().endswith(DICOM):
        return True
    with open(path, "rb") as f:
        return f.read(132)[128:132] == b"DICM"


def _dicom_values(ds) -> np.ndarray:
    """Pixel values through the modality LUT, float64; a colour image is reduced to its luma."""
    from pydicom.pixels import apply_modality_lut

    arr = ds.pixel_array
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.shape[-1:] == (3,) and int(ds.get("SamplesPerPixel", 1) or 1) == 3:
        arr = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
    else:
        arr = apply_modality_lut(arr, ds)
    arr = np.asarray(arr, np.float64)
    if photometric == "MONOCHROME1":
        arr = arr.max() + arr.min() - arr
    return arr


def _dicom_folder_order(files: list[str]) -> tuple[list[str], list]:
    """(files in slice order, their datasets): position along the normal, else InstanceNumber, else the name."""
    import pydicom

    sets = [pydicom.dcmread(f, force=True) for f in files]
    try:
        orient = np.asarray([float(v) for v in sets[0].ImageOrientationPatient], np.float64)
        normal = np.cross(orient[:3], orient[3:])
        keys = [float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])) for ds in sets]
    except (AttributeError, TypeError, ValueError):
        try:
            keys = [int(ds.InstanceNumber) for ds in sets]
        except (AttributeError, TypeError, ValueError):
            keys = [_natural(os.path.basename(f)) for f in files]
    order = sorted(range(len(files)), key=lambda i: (keys[i], _natural(os.path.basename(files[i]))))
    return [files[i] for i in order], [sets[i] for i in order]


def slice_indices(count: int, max_slices: int, sampling: str) -> np.ndarray:
    """Which of `count` slices are kept (in order)."""
    if not max_slices or max_slices >= count:
        return np.arange(count)
    if sampling == "uniform":
        return np.unique(np.round(np.linspace(0, count - 1, max_slices)).astype(int))
    if sampling == "center":
        start = (count - max_slices) // 2
        return np.arange(start, start + max_slices)
    raise DataError(f"slice_sampling={sampling!r}: expected 'uniform' or 'center'")


def _to_uint8(values: np.ndarray, window: str | None) -> np.ndarray:
    if window:
        center, width = _window(window)
        lo, hi = center - width / 2, center + width / 2
    else:
        lo, hi = float(values.min()), float(values.max())
    scaled = (values - lo) * (255.0 / max(hi - lo, 1e-12))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _window(window: str) -> tuple[float, float]:
    try:
        center, width = (float(v) for v in str(window).split(","))
    except ValueError:
        raise DataError(f"window={window!r}: expected 'CENTER,WIDTH', e.g. '40,400'") from None
    if width <= 0:
        raise DataError(f"window={window!r}: the width must be positive")
    return center, width


def load_volume(path: str, options: dict | None = None, origin: str = "") -> np.ndarray:
    """A volume's kept slices as uint8 (S, H, W), in slice order, intensity-mapped (module docstring)."""
    o = {k: v for k, (v, _) in OPTIONS.items()} | (options or {})
    where = f"{origin}: " if origin else ""
    if o["window"]:
        _window(o["window"])
    try:
        raw, is_8bit = _read(path)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure names the volume
        raise DataError(f"{where}volume {path}: cannot read it ({type(e).__name__}: {e})") from None
    if raw.ndim != 3 or raw.shape[0] == 0:
        raise DataError(f"{where}volume {path}: expected a stack of 2-D slices, got an array of shape {raw.shape}")
    raw = raw[slice_indices(raw.shape[0], o["max_slices"], o["slice_sampling"])]
    if is_8bit and not o["window"]:
        return raw.astype(np.uint8)
    return _to_uint8(raw, o["window"])


def _read(path: str) -> tuple[np.ndarray, bool]:
    """(S, H, W) values of every slice and whether they are already 8-bit images."""
    lower = path.lower()
    if os.path.isdir(path):
        files = sorted((os.path.join(path, f) for f in os.listdir(path)
                        if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)),
                       key=lambda f: _natural(os.path.basename(f)))
        if not files:
            raise DataError(f"volume {path}: a folder without slices; expected PNG / JPEG / TIFF / DICOM files")
        dicom = [_is_dicom(f) for f in files]
        if any(dicom) and not all(dicom):
            raise DataError(f"volume {path}: mixes DICOM and other image files; expected one kind of slice")
        if all(dicom):
            _, sets = _dicom_folder_order(files)
            return _stack([_dicom_values(ds) for ds in sets], path), False
        from medjax.data.transforms import decode

        return _stack([np.asarray(decode(f, 1), np.float64) for f in files], path), True
    if lower.endswith(NIFTI):
        try:
            import nibabel
        except ImportError:
            raise DataError(f"volume {path}: NIfTI files need nibabel (pip install nibabel)") from None
        data = np.asarray(nibabel.load(path).get_fdata(), np.float64)
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise DataError(f"volume {path}: a NIfTI image of shape {data.shape}; expected 3-D (X, Y, Z)")
        return np.transpose(data, (2, 1, 0)), False
    if _is_dicom(path):
        import pydicom

        ds = pydicom.dcmread(path, force=True)
        values = _dicom_values(ds)
        return (values[None] if values.ndim == 2 else values), False
    raise DataError(f"volume {path}: not a folder of slices, a DICOM or a NIfTI (.nii, .nii.gz) file")


def _stack(slices: list[np.ndarray], path: str) -> np.ndarray:
    shapes = {s.shape for s in slices}
    if len(shapes) > 1:
        raise DataError(f"volume {path}: its slices differ in size ({', '.join(map(str, sorted(shapes)))})")
    return np.stack(slices)


def slice_images(volume: np.ndarray, image_size: int) -> np.ndarray:
    """(S, H, W) uint8 slices -> (S, image_size, image_size, 1) uint8 through the eval transform."""
    from PIL import Image

    from medjax.data.transforms import eval_transform

    return np.stack([eval_transform(Image.fromarray(s, "L"), image_size) for s in volume])


# ------------------------------------------------------------------------------------------------ the dataset


def _kind_ok(path: str) -> bool:
    return os.path.isdir(path) or path.lower().endswith(NIFTI) or (os.path.isfile(path) and _is_dicom(path))


def read(root: str, **options) -> Dataset:
    """Reads the volumes CSV (see the module docstring and OPTIONS)."""
    o = take_options(OPTIONS, options, NAME)
    require_dir(root, "the folder holding volumes.csv and the volumes")
    if o["slice_sampling"] not in ("uniform", "center"):
        raise DataError(f"dataset 'volumes' option slice_sampling={o['slice_sampling']!r}: expected 'uniform' or "
                        "'center'")
    if o["max_slices"] < 0:
        raise DataError(f"dataset 'volumes' option max_slices={o['max_slices']}: expected 0 (all) or more")
    if o["window"]:
        _window(o["window"])
    csv_path = os.path.join(root, o["csv"])
    rows = list(read_csv(csv_path, ("volume", "label"), "a CSV with the columns volume, label[, patient, split]"))
    if rows and "split" in rows[0][1]:
        empty = [origin for origin, row in rows if not row.get("split")]
        if empty and len(empty) < len(rows):
            raise DataError(f"{empty[0]}: column 'split' is empty; give train, val or test on every row or on none")
    names = list(o["class_names"].split(",") if isinstance(o["class_names"], str) else o["class_names"] or
                 sorted({row["label"] for _, row in rows}))
    index = {n: i for i, n in enumerate(names)}
    records, split_of, seen = [], {}, {}
    for origin, row in rows:
        if row["label"] not in index:
            raise DataError(f"{origin}: label {row['label']!r} is not a class; classes: {', '.join(names)}")
        path = join_under(root, row["volume"], origin, "column 'volume'")
        if not os.path.exists(path):
            raise DataError(f"{origin}: volume {path} does not exist; expected a folder of slices, a DICOM or a "
                            "NIfTI file")
        if not _kind_ok(path):
            raise DataError(f"{origin}: volume {path} is not a folder of slices, a DICOM or a NIfTI file")
        if path in seen:
            raise DataError(f"{origin}: volume {row['volume']} is listed twice (first at {seen[path]})")
        seen[path] = origin
        record = Record(path, index[row["label"]], row.get("patient") or None, origin)
        records.append(record)
        if row.get("split"):
            if row["split"] not in SPLITS:
                raise DataError(f"{origin}: split {row['split']!r}; expected train, val or test")
            split_of[path] = row["split"]
    if len(names) < 2:
        raise DataError(f"{csv_path}: {len(names)} class; expected at least two labels")
    if split_of:
        splits = {s: [r for r in records if split_of[r.path] == s] for s in SPLITS}
    else:
        splits = split_by_group(records, {"val": o["val_fraction"], "test": o["test_fraction"]}, o["seed"])
    check_disjoint(splits, "patient")
    mean, std = statistics(splits.get("train", []), o)
    target = "roc_auc" if len(names) == 2 else "balanced_accuracy"
    dataset = Dataset(NAME, "multiclass", names, 1, target, mean, std, splits, root=root, options=o,
                      statistics_source=f"computed from up to {STATISTICS_VOLUMES} training volumes")
    return fill_splits(dataset)


def statistics(train: list[Record], options: dict) -> tuple[tuple[float], tuple[float]]:
    """Mean / std of the eval-transformed slices (in [0, 1]) of up to STATISTICS_VOLUMES training volumes."""
    total, total_sq, count = 0.0, 0.0, 0
    for r in train[:STATISTICS_VOLUMES]:
        x = slice_images(load_volume(r.path, options, r.origin), 224).astype(np.float64) / 255.0
        total, total_sq, count = total + x.sum(), total_sq + (x * x).sum(), count + x.size
    if not count:
        return (0.5,), (0.25,)
    mean = total / count
    return (float(mean),), (float(max(np.sqrt(max(total_sq / count - mean * mean, 0.0)), 1e-3)),)


# ------------------------------------------------------------------------------------------------ fine-tuning


def fixed_slices(count: int, num: int, sampling: str) -> np.ndarray:
    """Exactly `num` slice indices of a `count`-slice volume, for batches of equal shape: `sampling` as max_slices
    picks them from a longer volume; a shorter one repeats slices evenly (round(linspace(0, count - 1, num)))."""
    if count >= num:
        return slice_indices(count, num, sampling)
    return np.round(np.linspace(0, count - 1, num)).astype(int)


def load_volume_transform(base):
    """A grain map (built on the 2-D loader's `LoadAndTransform`, passed in as `base` to keep grain out of this
    module's imports) giving {'image': uint8 (S, size, size, 1), 'label', 'mask'} per volume: S = max_slices slices
    (`fixed_slices`), each through the train or eval transform; a train volume draws one set of augmentation
    parameters for all its slices."""
    from PIL import Image

    from medjax.data.transforms import eval_transform, sample_train_params, train_transform

    class LoadVolume(base):
        def __init__(self, records, *, options: dict, **kw):
            super().__init__(records, **kw)
            self.options = {k: v for k, (v, _) in OPTIONS.items()} | dict(options)
            self.num_slices = int(self.options["max_slices"])

        def _blank(self):
            return {"image": np.zeros((self.num_slices, self.image_size, self.image_size, 1), np.uint8),
                    "label": self.empty_label, "mask": np.bool_(False)}

        def map(self, slot):
            record = self.records[slot.index]
            if not slot.valid:
                return self._blank()
            try:
                volume = load_volume(record.path, {**self.options, "max_slices": 0}, record.origin)
            except Exception as e:  # noqa: BLE001 - reported with the file and row, as a 2-D image is
                self._report(record, f"cannot read the volume ({type(e).__name__}: {e})")
                return self._blank()
            keep = fixed_slices(len(volume), self.num_slices, self.options["slice_sampling"])
            slices = [Image.fromarray(volume[i], "L") for i in keep]
            if self.train:
                p = sample_train_params(np.random.default_rng((self.seed, 1, slot.epoch, slot.index)), self.image_size)
                images = [train_transform(img, p, self.image_size, self.resize) for img in slices]
            else:
                images = [eval_transform(img, self.image_size, self.resize) for img in slices]
            return {"image": np.stack(images), "label": self._label(record), "mask": np.bool_(True)}

    return LoadVolume
