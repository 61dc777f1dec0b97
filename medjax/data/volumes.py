"""3-D studies for the slice-wise protocols (the radiology study's CT set): one record per volume, a CSV of volumes.

Layout: `root/volumes.csv` (option `csv`) with the columns `volume` (a path relative to root) and `label` (a class
name), and optionally `patient` and `split` (train / val / test, on every row or none). A volume is
- a folder of 2-D slices: PNG / JPEG / BMP / TIFF, or DICOM files recognised by content (the 'DICM' marker, or a
  header that parses; any name, no extension needed). DICOMDIR, non-image DICOM objects and localizers (ImageType
  LOCALIZER) are left out; the rest must be one series (SeriesInstanceUID; option `series` picks one where a folder
  holds several) of one size and orientation, else a DataError names what was found. Slices are ordered by their
  position along the slice normal (ImagePositionPatient projected on the cross product of ImageOrientationPatient's
  rows; two at one position are refused), else by InstanceNumber, else by file name in natural order (`slice2`
  before `slice10`);
- a multi-frame DICOM file: enhanced multi-frame frames by PlanePositionSequence along the normal of
  PlaneOrientationSequence (functional groups, per frame or shared), else in file order;
- a NIfTI file (`.nii` or `.nii.gz`, read with nibabel), first reoriented to the closest canonical orientation (RAS+,
  nibabel's `as_closest_canonical`): slice k is `data[:, :, k].T` (inferior to superior; rows run posterior to
  anterior, columns the patient's left to right), whatever the file's affine.

Classes: the labels' names sorted, or `class_names`. Split: the CSV's `split` column, else seeded and
patient-disjoint (`val_fraction`, `test_fraction` of the volumes; a volume without a patient is its own group).

Slices: every slice, or `max_slices` of them: spread evenly over the volume (`slice_sampling='uniform'`: indices
round(linspace(0, S - 1, max_slices))) or the middle ones (`'center'`).
Intensity, one mapping per volume: DICOM values pass the modality rescale first (Hounsfield units for CT; per frame
from the functional groups' PixelValueTransformationSequence in enhanced multi-frame files); colour (RGB, YBR,
PALETTE COLOR through its lookup table) is reduced to its luma; then `window='C,W'` maps [C - W/2, C + W/2] to 0..255
(e.g. '40,400', CT soft tissue), or by default the volume's own finite min..max does; NaN and infinite voxels are
background (0). PNG / JPEG slices keep their 8-bit values (16-bit ones are scaled by their bit depth).
Statistics: mean / std of the slices as the model sees them (eval transform) over up to 16 training volumes.

Use: the frozen protocols (`python -m medjax.protocols probe|knn|fewshot --dataset volumes`) embed every slice with
the eval transform, one by one, and average its features per volume (`medjax/protocols/features.py`). Fine-tuning
(`python -m medjax.main` with `dataset="volumes"` and `data_options.max_slices=S`): each row of a batch is S slices of
a volume (`fixed_slices`: a shorter volume repeats slices evenly), each through the train or eval transform, and the
classifier's logits for the volume are the mean of its slices' logits. `python -m medjax.data fake --dataset volumes`
writes synthetic studies in all three forms. A volume that cannot be read stops with a
DataError naming it and its CSV line. User documentation, with every error line: docs/volumes.md.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut

from medjax.data.records import (
    IMAGE_EXTENSIONS,
    DataError,
    Dataset,
    Record,
    fill_splits,
    join_under,
    read_csv,
    require_dir,
    take_options,
)
from medjax.data.splits import check_disjoint, split_by_group
from medjax.data.transforms import (
    decode,
    eval_transform,
    fill_transfer_syntax,
    palette_rgb,
    sample_train_params,
    train_transform,
)

NAME = "volumes"
OPTIONS = {
    "csv": ("volumes.csv", "the CSV of volumes (columns volume, label[, patient, split]), relative to the root"),
    "class_names": (None, "class names in order (default: the labels found, sorted)"),
    "max_slices": (0, "at most this many slices per volume (0: all)"),
    "slice_sampling": ("uniform", "which slices with max_slices: 'uniform' (evenly spread) or 'center'"),
    "window": (None, "'C,W': map [C - W/2, C + W/2] to 0..255 (CT windows); default: each volume's min..max"),
    "series": (None, ("SeriesInstanceUID(s), comma-separated: in a DICOM folder holding several series, the one "
                      "to read (docs/volumes.md)")),
    "seed": (0, "split seed (when the CSV has no split column)"),
    "val_fraction": (0.15, "fraction of volumes in val (whole patients)"),
    "test_fraction": (0.15, "fraction of volumes in test (whole patients)"),
}
SPLITS = ("train", "val", "test")
NIFTI = (".nii", ".nii.gz")
DICOM = (".dcm", ".dicom")
PILLOW = tuple(e for e in IMAGE_EXTENSIONS if e not in DICOM)
STATISTICS_VOLUMES = 16
READER_VERSION = 2  # in the protocols' feature-cache key: 2 = issue 22 (series, HU of enhanced CT, NaN, RAS+ NIfTI)


# ------------------------------------------------------------------------------------------------ reading slices
# pydicom and nibabel are imported where a volume is read: each costs 0.15-0.25 s (measured on 2 loaded cores), which
# every `import medjax.data` would otherwise pay.


def _natural(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def is_dicom(path: str) -> bool:
    """A DICOM file, by content: the 'DICM' marker at offset 128, else (old files without the preamble and file meta)
    a header that parses into DICOM image or study elements. A '.dcm' / '.dicom' name counts too (an unreadable one
    then fails with its reason); PNG / JPEG / BMP / TIFF files without the marker are images."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    if head[128:132] == b"DICM":
        return True
    lower = path.lower()
    if lower.endswith(DICOM):
        return True
    if lower.endswith(PILLOW) or len(head) < 8:
        return False
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - anything pydicom cannot parse is not DICOM
        return False
    return any(k in ds for k in ("SOPClassUID", "Modality", "StudyInstanceUID", "SeriesInstanceUID"))


def _frame_groups(ds, frames: int) -> list[list]:
    """Per frame, the functional-group items that apply to it: its own (PerFrameFunctionalGroupsSequence) first,
    then the shared ones; [] for a file without functional groups."""
    shared = list(ds.get("SharedFunctionalGroupsSequence") or [])[:1]
    per = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    if not shared and not per:
        return [[] for _ in range(frames)]
    return [([per[i]] if i < len(per) else []) + shared for i in range(frames)]


def _from_groups(groups: list, sequence: str, keyword: str):
    """The first `keyword` found in `sequence` of the frame's functional groups, else None."""
    for item in groups:
        for sub in item.get(sequence) or []:
            if keyword in sub:
                return sub[keyword].value
    return None


def _rescale(arr: np.ndarray, ds, groups: list[list]) -> np.ndarray:
    """Stored values -> modality values: per frame the rescale of the functional groups (enhanced multi-frame:
    PixelValueTransformationSequence), else the file's own modality LUT or rescale (pydicom's apply_modality_lut)."""
    pairs = [(_from_groups(g, "PixelValueTransformationSequence", "RescaleSlope"),
              _from_groups(g, "PixelValueTransformationSequence", "RescaleIntercept")) for g in groups]
    if not any(slope is not None or intercept is not None for slope, intercept in pairs):
        return np.asarray(apply_modality_lut(arr, ds), np.float64)
    out = np.asarray(arr, np.float64).reshape((len(groups),) + arr.shape[-2:]).copy()
    for i, (slope, intercept) in enumerate(pairs):
        out[i] = out[i] * float(1.0 if slope is None else slope) + float(0.0 if intercept is None else intercept)
    return out.reshape(arr.shape)


def _dicom_values(ds, path: str) -> np.ndarray:
    """(frames, H, W) float64: pixel values through the modality rescale (per frame where the functional groups give
    one), colour (RGB, YBR, PALETTE COLOR through its lookup table) reduced to its luma (ITU-R 601), MONOCHROME1
    inverted; frames in slice order (`_frame_order`)."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        kind = ds.get("SOPClassUID")
        raise DataError(f"volume {path}: no pixel data (SOP class {getattr(kind, 'name', kind) or 'unknown'}); "
                        "expected an image DICOM")
    fill_transfer_syntax(ds)
    arr = ds.pixel_array
    frames = _frame_count(ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        arr = palette_rgb(arr, ds)[..., :3]
    if int(ds.get("SamplesPerPixel", 1) or 1) == 3 or photometric == "PALETTE COLOR":
        arr = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
        arr = np.asarray(arr, np.float64)
    else:
        arr = _rescale(arr, ds, _frame_groups(ds, frames))
    if photometric == "MONOCHROME1":
        finite = arr[np.isfinite(arr)]
        arr = (finite.max() + finite.min() - arr) if finite.size else arr
    arr = arr.reshape((frames,) + arr.shape[-2:])
    return arr[_frame_order(ds, frames, path)]


def _frame_count(ds) -> int:
    try:
        return int(str(ds.get("NumberOfFrames", 1) or 1))
    except ValueError:
        return 1


def _vector(value, size: int):
    try:
        v = np.asarray([float(x) for x in value], np.float64)
    except (TypeError, ValueError):
        return None
    return v if v.shape == (size,) and np.all(np.isfinite(v)) else None


def _same_direction(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.allclose(a, b, atol=1e-3))


def _position_order(orients: list, positions: list, names: list[str], what: str) -> np.ndarray | None:
    """Indices sorted by position along the slice normal (ImagePositionPatient projected on the cross product of
    ImageOrientationPatient's rows); None where a slice lacks either. Raises DataError when two slices share a
    position (several stacks in one: echoes, time points, ...)."""
    if any(o is None for o in orients) or any(p is None for p in positions):
        return None
    normal = np.cross(orients[0][:3], orients[0][3:])
    keys = np.asarray([float(np.dot(normal, p)) for p in positions])
    order = np.asarray(sorted(range(len(keys)), key=lambda i: (keys[i], _natural(names[i]))), int)
    sorted_keys = keys[order]
    same = np.flatnonzero(np.abs(np.diff(sorted_keys)) < 1e-4)
    if same.size:
        a, b = order[same[0]], order[same[0] + 1]
        raise DataError(f"{what}: {names[a]} and {names[b]} lie at the same position ({sorted_keys[same[0]]:g} mm "
                        "along the slice normal); expected one stack of slices, not several (echoes, time points, "
                        "repeats)")
    return order


def _frame_order(ds, frames: int, path: str) -> np.ndarray:
    """A multi-frame file's frames in slice order: by PlanePositionSequence (per frame) along the normal of
    PlaneOrientationSequence (per frame or shared, else the file's ImageOrientationPatient) where every frame has
    them, else in file order. Frames of different orientations stop with a DataError."""
    groups = _frame_groups(ds, frames)
    if frames == 1 or not any(groups):
        return np.arange(frames)
    top = _vector(ds.get("ImageOrientationPatient"), 6)
    orients = [_vector(_from_groups(g, "PlaneOrientationSequence", "ImageOrientationPatient"), 6) for g in groups]
    orients = [top if o is None else o for o in orients]
    positions = [_vector(_from_groups(g, "PlanePositionSequence", "ImagePositionPatient"), 3) for g in groups]
    known = [o for o in orients if o is not None]
    if known and not all(_same_direction(known[0], o) for o in known):
        kinds = _distinct(known)
        raise DataError(f"volume {path}: its frames lie in {len(kinds)} orientations "
                        f"({'; '.join(_orientation_text(o) for o in kinds)}); expected one stack of parallel slices")
    order = _position_order(orients, positions, [f"frame {i + 1}" for i in range(frames)], f"volume {path}")
    return np.arange(frames) if order is None else order


def _distinct(orients: list) -> list:
    kinds = []
    for o in orients:
        if not any(_same_direction(k, o) for k in kinds):
            kinds.append(o)
    return kinds


def _orientation_text(o: np.ndarray) -> str:
    return "orientation " + "\\".join(f"{v:g}" for v in np.round(o, 3) + 0.0)  # + 0.0: no "-0"


def _image_type(ds) -> list[str]:
    value = ds.get("ImageType")
    if value is None:
        return []
    values = [value] if isinstance(value, (str, bytes)) else list(value)
    return [str(v).strip().upper() for v in values]


def _series_text(uid: str, members: list) -> str:
    ds = members[0][1]
    extra = ", ".join(str(v) for v in (ds.get("Modality"), ds.get("SeriesDescription")) if v)
    return f"{uid or '(no SeriesInstanceUID)'} ({len(members)} file{'s' if len(members) != 1 else ''}" + \
        (f", {extra})" if extra else ")")


def wanted_series(value) -> list[str]:
    """The `series` option as a list of SeriesInstanceUIDs (a comma-separated string or a list)."""
    if value is None or value == "":
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(v).strip() for v in items if str(v).strip()]


def _dicom_folder(path: str, files: list[str], series: list[str]) -> np.ndarray:
    """A folder of DICOM files -> (S, H, W) values of one series (module docstring: series, localizers, order)."""
    heads = []
    for f in files:
        try:  # pixel data stays on disk until a chosen slice is decoded
            heads.append((f, pydicom.dcmread(f, force=True, defer_size=1024)))
        except Exception as e:  # noqa: BLE001 - names the file
            raise DataError(f"volume {path}: cannot read {os.path.basename(f)} ({type(e).__name__}: {e})") from None
    images = [(f, ds) for f, ds in heads
              if any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))]
    if not images:
        raise DataError(f"volume {path}: {len(heads)} DICOM file{'s' if len(heads) != 1 else ''} but no image among "
                        "them (reports, directories, ...); expected the slices of one series")
    kept = [(f, ds) for f, ds in images if "LOCALIZER" not in _image_type(ds)]
    if not kept:
        raise DataError(f"volume {path}: only localizer images (ImageType LOCALIZER, {len(images)} files); expected "
                        "the slices of a series besides them")
    groups: dict[str, list] = {}
    for f, ds in kept:
        groups.setdefault(str(ds.get("SeriesInstanceUID", "") or ""), []).append((f, ds))
    if len(groups) > 1:
        chosen = [uid for uid in groups if uid in series]
        if len(chosen) != 1:
            found = "; ".join(_series_text(uid, groups[uid]) for uid in sorted(groups))
            what = f"the option series names {len(chosen)} of them" if series else "no series is chosen"
            raise DataError(f"volume {path}: {len(groups)} series in one folder ({what}): {found}; pick one with the "
                            "dataset option series=UID (--option series=UID, or data_options.series in a config; a "
                            "comma-separated list picks one series per folder)")
        members = groups[chosen[0]]
    else:
        members = next(iter(groups.values()))
    uid = str(members[0][1].get("SeriesInstanceUID", "") or "(no SeriesInstanceUID)")
    where = f"volume {path}: series {uid}"
    multi = [f for f, ds in members if _frame_count(ds) > 1]
    if multi:
        if len(members) > 1:
            raise DataError(f"{where} holds {len(members)} files, {len(multi)} of them multi-frame "
                            f"({os.path.basename(multi[0])}); expected single-frame slices, or name one multi-frame "
                            "file as the volume")
        return _dicom_values(members[0][1], members[0][0])
    sizes = sorted({(int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)) for _, ds in members})
    if len(sizes) > 1:
        raise DataError(f"{where} holds slices of {len(sizes)} sizes ({', '.join(f'{r}x{c}' for r, c in sizes)}); "
                        "expected one stack of slices of one size")
    orients = [_vector(ds.get("ImageOrientationPatient"), 6) for _, ds in members]
    kinds = _distinct([o for o in orients if o is not None])
    if len(kinds) > 1:
        raise DataError(f"{where} holds slices of {len(kinds)} orientations "
                        f"({'; '.join(_orientation_text(o) for o in kinds)}); expected one stack of parallel slices")
    names = [os.path.basename(f) for f, _ in members]
    order = _position_order(orients, [_vector(ds.get("ImagePositionPatient"), 3) for _, ds in members], names,
                            where)
    if order is None:
        try:
            keys = [int(ds.InstanceNumber) for _, ds in members]
        except (AttributeError, TypeError, ValueError):
            keys = [0] * len(members)
        order = sorted(range(len(members)), key=lambda i: (keys[i], _natural(names[i])))
    slices = []
    for i in order:
        f, ds = members[i]
        slices.append(_dicom_values(ds, f)[0])
    return _stack(slices, path)


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
    """The window (or the finite values' own min..max) to 0..255; NaN and infinite voxels are background (0)."""
    finite = np.isfinite(values)
    if window:
        center, width = _window(window)
        lo, hi = center - width / 2, center + width / 2
    elif finite.any():
        lo, hi = float(values[finite].min()), float(values[finite].max())
    else:
        return np.zeros(values.shape, np.uint8)
    scaled = (np.where(finite, values, lo) - lo) * (255.0 / max(hi - lo, 1e-12))
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
        raw, is_8bit = _read(path, wanted_series(o.get("series")))
    except DataError as e:
        if not where:
            raise
        raise DataError(f"{where}{e}") from None
    except Exception as e:  # noqa: BLE001 - any reader failure names the volume
        raise DataError(f"{where}volume {path}: cannot read it ({type(e).__name__}: {e})") from None
    if raw.ndim != 3 or raw.shape[0] == 0:
        raise DataError(f"{where}volume {path}: expected a stack of 2-D slices, got an array of shape {raw.shape}")
    raw = raw[slice_indices(raw.shape[0], o["max_slices"], o["slice_sampling"])]
    if is_8bit and not o["window"]:
        return raw.astype(np.uint8)
    return _to_uint8(raw, o["window"])


def _read(path: str, series: list[str]) -> tuple[np.ndarray, bool]:
    """(S, H, W) values of every slice and whether they are already 8-bit images."""
    lower = path.lower()
    if os.path.isdir(path):
        names = sorted((f for f in os.listdir(path) if not f.startswith(".") and f.upper() != "DICOMDIR"
                        and os.path.isfile(os.path.join(path, f))), key=_natural)
        files = [os.path.join(path, f) for f in names]
        dicom = [f for f in files if is_dicom(f)]
        images = [f for f in files if f.lower().endswith(PILLOW) and f not in dicom]
        if dicom and images:
            raise DataError(f"volume {path}: mixes DICOM and other image files ({os.path.basename(dicom[0])}, "
                            f"{os.path.basename(images[0])}); expected one kind of slice")
        if dicom:
            return _dicom_folder(path, dicom, series), False
        if not images:
            sub = [f for f in os.listdir(path) if os.path.isdir(os.path.join(path, f)) and not f.startswith(".")]
            hint = f" (its subfolders {', '.join(sorted(sub)[:3])}{', ...' if len(sub) > 3 else ''} are not " \
                "read: name the folder of one series)" if sub else ""
            raise DataError(f"volume {path}: a folder without slices{hint}; expected PNG / JPEG / BMP / TIFF or DICOM "
                            "files")
        return _stack([np.asarray(decode(f, 1), np.float64) for f in images], path), True
    if lower.endswith(NIFTI):
        return _nifti(path), False
    if is_dicom(path):
        return _dicom_values(pydicom.dcmread(path, force=True), path), False
    raise DataError(f"volume {path}: not a folder of slices, a DICOM or a NIfTI (.nii, .nii.gz) file")


def _nifti(path: str) -> np.ndarray:
    """A NIfTI file -> (S, H, W): reoriented to the closest canonical orientation (RAS+: the voxel axes run to the
    patient's right, anterior, superior; nibabel's as_closest_canonical), then slice k is data[:, :, k].T."""
    try:
        import nibabel
    except ImportError:
        raise DataError(f"volume {path}: NIfTI files need nibabel (pip install nibabel)") from None
    image = nibabel.load(path)
    if len(image.shape) == 4 and image.shape[3] == 1:
        image = image.slicer[..., 0]
    if len(image.shape) != 3:
        raise DataError(f"volume {path}: a NIfTI image of shape {tuple(image.shape)}; expected 3-D (X, Y, Z)")
    data = np.asarray(nibabel.as_closest_canonical(image).get_fdata(), np.float64)
    return np.transpose(data, (2, 1, 0))


def _stack(slices: list[np.ndarray], path: str) -> np.ndarray:
    shapes = {s.shape for s in slices}
    if len(shapes) > 1:
        raise DataError(f"volume {path}: its slices differ in size ({', '.join(map(str, sorted(shapes)))})")
    return np.stack(slices)


def slice_images(volume: np.ndarray, image_size: int) -> np.ndarray:
    """(S, H, W) uint8 slices -> (S, image_size, image_size, 1) uint8 through the eval transform."""
    return np.stack([eval_transform(Image.fromarray(s, "L"), image_size) for s in volume])


# ------------------------------------------------------------------------------------------------ the dataset


def _kind_ok(path: str) -> bool:
    return os.path.isdir(path) or path.lower().endswith(NIFTI) or (os.path.isfile(path) and is_dicom(path))


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
    if o["series"] is not None and not (isinstance(o["series"], str) or
                                        isinstance(o["series"], (list, tuple)) and all(isinstance(v, str)
                                                                                       for v in o["series"])):
        raise DataError(f"dataset 'volumes' option series={o['series']!r}: expected SeriesInstanceUIDs, "
                        "comma-separated")
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
