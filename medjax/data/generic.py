"""A user's own dataset: a CSV of image paths and labels (`csv`) or a folder per class (`folder`).

csv: `root/labels.csv` (or `csv=`), image paths relative to `root` in `image_column`. Multi-class: one class name per
row in `label_column`. Multi-label: 0/1 columns named in `label_columns`, or `multilabel=True` with
`separator`-joined class names in `label_column` (empty = no class). Optional `patient_column` (splits are then
patient-disjoint) and `split_column` (train/val/test per row; otherwise a seeded split, 80/10/10 by default).

folder: `root/<class>/**/<image>`, or `root/{train,val,test}/<class>/**/<image>` for fixed splits. Classes are the
sorted folder names unless `class_names` gives them.

Statistics default to ImageNet's (the red channel's for `channels=1`); pass `mean` and `std` for your data.
"""

from __future__ import annotations

import os

from medjax.data.records import (
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    Dataset,
    Record,
    fill_splits,
    join_under,
    merge_duplicates,
    read_csv,
    require_dir,
    take_options,
    walk_images,
)
from medjax.data.splits import check_disjoint, split_by_group

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def _stats(channels, mean, std):
    if channels not in (1, 3):
        raise DataError(f"channels={channels}: expected 1 (grayscale) or 3 (RGB)")
    mean = tuple(mean) if mean is not None else IMAGENET_MEAN[:channels]
    std = tuple(std) if std is not None else IMAGENET_STD[:channels]
    if len(mean) != channels or len(std) != channels:
        raise DataError(f"mean {mean} and std {std} must have {channels} value(s), one per channel")
    return mean, std


def _metric(task, num_classes, target_metric):
    if target_metric:
        return target_metric
    return "mean_auc" if task == "multilabel" else "roc_auc" if num_classes == 2 else "balanced_accuracy"


def _finish(name, root, task, class_names, channels, mean, std, target_metric, records, split_of, seed, fractions,
            options) -> Dataset:
    if split_of is not None:
        splits = {s: [r for r, sp in zip(records, split_of) if sp == s] for s in ("train", "val", "test")}
    else:
        splits = split_by_group(records, fractions, seed)
    check_disjoint(splits, root)
    mean, std = _stats(channels, mean, std)
    return fill_splits(Dataset(name, task, list(class_names), channels, _metric(task, len(class_names), target_metric),
                               mean, std, splits, root=root, options=options))


_COMMON = {
    "seed": (0, "split seed"),
    "val_fraction": (0.1, "fraction of images in val (seeded split)"),
    "test_fraction": (0.1, "fraction of images in test (seeded split)"),
    "channels": (3, "1 (grayscale) or 3 (RGB)"),
    "mean": (None, "per-channel mean of pixels in [0, 1] (default: ImageNet's)"),
    "std": (None, "per-channel std of pixels in [0, 1] (default: ImageNet's)"),
    "target_metric": (None, "metric that picks the best model (default: mean_auc, roc_auc or balanced_accuracy)"),
}
CSV_OPTIONS = {
    "csv": ("labels.csv", "the CSV, relative to the root (or absolute)"),
    "image_column": ("image", "column of image paths relative to the root"),
    "label_column": ("label", "column of class names (multi-label: separator-joined)"),
    "label_columns": (None, "list of 0/1 columns, one per class (instead of label_column)"),
    "multilabel": (None, "multi-label task (default: true when label_columns is given)"),
    "separator": ("|", "separator of class names in label_column for multi-label data"),
    "class_names": (None, "class names in order (default: sorted names found, or label_columns)"),
    "patient_column": (None, "column of patient ids: splits become patient-disjoint"),
    "split_column": (None, "column of train/val/test per row: fixed splits"),
    **_COMMON,
}
FOLDER_OPTIONS = {
    "class_names": (None, "class folder names in order (default: sorted folder names)"),
    **_COMMON,
}


def read_csv_dataset(root: str, **options) -> Dataset:
    """Reads a user's CSV dataset (see the module docstring and CSV_OPTIONS)."""
    o = take_options(CSV_OPTIONS, options, "csv")
    (csv, image_column, label_column, label_columns, multilabel, separator, class_names, patient_column,
     split_column, seed, val_fraction, test_fraction, channels, mean, std, target_metric) = (o[k] for k in CSV_OPTIONS)
    require_dir(root, "the dataset folder holding the CSV and the images")
    csv_path = csv if os.path.isabs(csv) else os.path.join(root, csv)
    multilabel = bool(label_columns) if multilabel is None else multilabel
    label_cols = list(label_columns or [label_column])
    required = [image_column, *label_cols] + [c for c in (patient_column, split_column) if c]
    rows = list(read_csv(csv_path, required, "a CSV with image paths and labels"))
    if label_columns:
        names = list(class_names or label_columns)
        if len(names) != len(label_columns):
            raise DataError(f"class_names {names} must name the {len(label_columns)} label_columns")
    elif class_names:
        names = list(class_names)
    else:
        values = {v for _, row in rows for v in (row[label_column].split(separator) if multilabel
                                                 else [row[label_column]]) if v}
        names = sorted(values)
    records, split_of = [], []
    for origin, row in rows:
        if label_columns:
            cells = [row[c] for c in label_columns]
            try:
                hot = tuple(int(float(c or 0)) for c in cells)
            except ValueError:
                hot = ()
            if not hot or any(h not in (0, 1) for h in hot):
                raise DataError(f"{origin}: label columns {label_columns} must hold 0 or 1, got {cells}")
            if not multilabel and sum(hot) != 1:
                raise DataError(f"{origin}: expected exactly one of {label_columns} set to 1, got {cells}")
            label = hot if multilabel else hot.index(1)
        else:
            given = [v for v in row[label_column].split(separator) if v] if multilabel else [row[label_column]]
            unknown = [v for v in given if v not in names]
            if unknown:
                raise DataError(f"{origin}: label {unknown[0]!r} is not one of the classes {names}")
            label = tuple(int(n in given) for n in names) if multilabel else names.index(given[0])
        if split_column:
            split = SPLIT_NAMES.get(row[split_column].lower())
            if split is None:
                raise DataError(f"{origin}: split {row[split_column]!r} is not train, val or test")
            split_of.append(split)
        patient = row[patient_column] or None if patient_column else None
        records.append(Record(join_under(root, row[image_column], origin, f"column {image_column!r}"), label, patient,
                              origin))
    if not records:
        raise DataError(f"{csv_path}: no rows")
    records, split_of, repeated = merge_duplicates(records, split_of if split_column else None)
    options = {**o, "multilabel": multilabel}
    dataset = _finish("csv", root, "multilabel" if multilabel else "multiclass", names, channels, mean, std,
                      target_metric, records, split_of, seed, {"val": val_fraction, "test": test_fraction},
                      options)
    dataset.excluded.extend(repeated)
    return dataset


def _images_under(folder: str) -> list[str]:
    """Image files below `folder`, following symlinked sub-folders (a common layout) but each real file once."""
    return walk_images(folder)


def read_folder(root: str, **options) -> Dataset:
    """Reads a folder-per-class dataset (see the module docstring and FOLDER_OPTIONS)."""
    o = take_options(FOLDER_OPTIONS, options, "folder")
    class_names, seed, val_fraction, test_fraction, channels, mean, std, target_metric = (o[k] for k in FOLDER_OPTIONS)
    require_dir(root, "a folder with one sub-folder per class (or train/, val/, test/ holding those)")
    fixed = [s for s in ("train", "val", "test") if os.path.isdir(os.path.join(root, s))]
    if fixed and "train" not in fixed:
        raise DataError(f"{root}: has {'/, '.join(fixed)}/ but no train/ folder")
    parts = {s: os.path.join(root, s) for s in fixed} if fixed else {"all": root}
    found = sorted({d for p in parts.values() for d in os.listdir(p) if os.path.isdir(os.path.join(p, d))})
    names = list(class_names) if class_names else found
    unknown = [d for d in found if d not in names]
    if unknown:
        raise DataError(f"{root}: folder {unknown[0]!r} is not one of the classes {names}")
    if not names:
        raise DataError(f"{root}: no class folders found")
    records, split_of = [], []
    for split, folder in parts.items():
        for label, name in enumerate(names):
            for path in _images_under(os.path.join(folder, name)):
                records.append(Record(path, label, None, f"{os.path.join(folder, name)}/"))
                split_of.append(split)
    if not records:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders")
    options = {**o, "class_names": names}
    return _finish("folder", root, "multiclass", names, channels, mean, std, target_metric, records,
                   split_of if fixed else None, seed, {"val": val_fraction, "test": test_fraction}, options)
