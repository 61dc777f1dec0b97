"""Confidence intervals of test metrics, and paired comparisons of two runs (issue 15 item 4).

Percentile bootstrap: resample b (b = 0 .. B-1) draws `rng.integers(0, U, U)` from one
`numpy.random.default_rng(seed)` (U units: patients where the test records carry patient ids, else images), takes
the images of the drawn units (a patient drawn twice brings all its images twice), and recomputes every scalar metric
with `medjax.metrics.compute_metrics`. The interval is the (alpha, 1 - alpha) quantiles (linear interpolation,
alpha = (1 - confidence) / 2) of the resampled values: scipy.stats.bootstrap's `method='percentile'` on the same
draws (tests/test_bootstrap.py checks both against direct numpy and scipy computations). A resample on which a
metric is undefined (e.g. ROC-AUC of a resample with one class) is left out of that metric's interval and counted.

Resampling patients, not images, keeps a patient's correlated images together, as the test split keeps them: image
resampling would treat them as independent and give too narrow intervals. Images without a patient id are each
their own unit.

The reported value stays the metric of the whole test set; the bootstrap mean (what the glioma study reported) and
standard deviation are stored beside the interval.

Comparison (`compare`): the two runs' per-image test predictions (`test_predictions.npz`, written by the trainer) are
aligned by image path and put in path order (so the resamples do not depend on either file's row order); every
resample draws units once and evaluates both runs on the same images, so the difference A - B of each metric gets
a percentile interval and a two-sided bootstrap p-value p = min(1, 2 (1 + min(#{d_b <= 0}, #{d_b >= 0})) / (B' + 1))
over the B' resamples where both are defined (the p-value of the percentile interval's test of 0, with the +1
correction so that it is never 0).
"""

from __future__ import annotations

import math
import os

import numpy as np

from medjax import metrics as metrics_lib
from medjax import rundir
from medjax.errors import UserError, atomic_write

PREDICTIONS_FILE = rundir.TEST_PREDICTIONS
# Top-level numbers of a metrics dict that are counts or settings, not metrics.
NOT_METRICS = frozenset({"num_samples", "num_examples", "threshold", "num_auc_classes", "num_ap_classes"})


class BootstrapError(UserError):
    """Predictions that cannot be bootstrapped or compared; the message names the file and what is wrong."""


# ------------------------------------------------------------------------------------------------ units


def scalar_metric_names(metrics: dict) -> list[str]:
    """The top-level scalar metrics of a `compute_metrics` dict (None counts: a metric undefined on the full set
    may be defined on resamples), in the dict's order."""
    return [k for k, v in metrics.items() if k not in NOT_METRICS and k != "task"
            and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))]


class Units:
    """The resampling units of a split: `unit_of[i]` is image i's unit (units numbered in order of first
    appearance); a drawn row of units expands to its images, each unit's images in split order."""

    def __init__(self, patients=None, n: int | None = None):
        n = len(patients) if patients is not None else n
        ids = [None if p is None or (isinstance(p, str) and not p) else str(p) for p in patients] \
            if patients is not None else [None] * n
        index: dict[str, int] = {}
        unit_of = np.empty(n, np.int64)
        for i, p in enumerate(ids):
            key = ("image", i) if p is None else ("patient", p)
            unit_of[i] = index.setdefault(key, len(index))
        self.unit_of, self.num_images, self.num_units = unit_of, n, len(index)
        self.num_patients = sum(1 for k in index if k[0] == "patient")
        self.kind = "patient" if self.num_patients else "image"
        self.order = np.argsort(unit_of, kind="stable")
        self.counts = np.bincount(unit_of, minlength=self.num_units)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)

    def expand(self, drawn: np.ndarray) -> np.ndarray:
        """Image indices of the drawn units, concatenated in draw order."""
        if self.kind == "image":
            return drawn
        c = self.counts[drawn]
        offsets = np.repeat(self.starts[drawn] - (np.cumsum(c) - c), c) + np.arange(int(c.sum()))
        return self.order[offsets]

    def describe(self) -> dict:
        out = {"unit": self.kind, "num_units": self.num_units, "num_images": self.num_images}
        if self.kind == "patient":
            out["note"] = ("patients resampled, not images (the records' patient ids; the lesion for HAM10000 / "
                           "ISIC 2018)")
            if self.num_patients < self.num_units:
                out["note"] += f"; {self.num_units - self.num_patients} image(s) without a patient id are own units"
        else:
            out["note"] = "images resampled (the test records carry no patient ids)"
        return out


def draws(num_units: int, resamples: int, seed: int):
    """The B rows of drawn units, one `integers(0, U, U)` call per resample of one seeded generator."""
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        yield rng.integers(0, num_units, num_units)


def quantiles(values, confidence: float) -> tuple[float, float]:
    alpha = (1 - confidence) / 2
    low, high = np.quantile(np.asarray(values, np.float64), [alpha, 1 - alpha])
    return float(low), float(high)


def _check(resamples, confidence):
    if not isinstance(resamples, (int, np.integer)) or resamples < 1:
        raise BootstrapError(f"bootstrap resamples must be a positive integer, got {resamples!r}")
    if not 0 < confidence < 1:
        raise BootstrapError(f"bootstrap confidence must lie in (0, 1), got {confidence!r}")


def _values(metric_dicts_fn, units: Units, names, resamples: int, seed: int):
    """{name: (B,) float64, NaN where undefined} from metric_dicts_fn(image indices) -> {name: value}."""
    out = {name: np.full(resamples, np.nan) for name in names}
    for b, drawn in enumerate(draws(units.num_units, resamples, seed)):
        values = metric_dicts_fn(units.expand(drawn))
        for name in names:
            v = values.get(name)
            if v is not None:
                out[name][b] = v
    return out


def _summary(point, values: np.ndarray, confidence: float) -> dict:
    defined = values[~np.isnan(values)]
    entry = {"value": point, "low": None, "high": None, "mean": None, "std": None,
             "undefined_resamples": int(len(values) - len(defined))}
    if len(defined):
        entry["low"], entry["high"] = quantiles(defined, confidence)
        entry["mean"] = float(defined.mean())
        entry["std"] = float(defined.std(ddof=1)) if len(defined) > 1 else 0.0
    return entry


# ------------------------------------------------------------------------------------------------ intervals


def bootstrap_metrics(task: str, probs, labels, class_names, patients=None, *, resamples: int = 1000, seed: int = 0,
                      confidence: float = 0.95) -> dict:
    """Percentile bootstrap intervals of every scalar metric of `compute_metrics(task, probs, labels, class_names)`.

    patients: (N,) ids (None / '' for none) or None: resample patients where any id is given, else images.
    Returns {'method', 'confidence', 'resamples', 'seed', 'unit', 'num_units', 'num_images', 'note',
    'metrics': {name: {'value', 'low', 'high', 'mean', 'std', 'undefined_resamples'}}}."""
    _check(resamples, confidence)
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
    units = Units(patients, n=len(probs))
    if units.num_images != len(probs):
        raise BootstrapError(f"{units.num_images} patient ids for {len(probs)} predictions")
    point = metrics_lib.compute_metrics(task, probs, labels, class_names)
    names = scalar_metric_names(point)
    values = _values(lambda idx: metrics_lib.compute_metrics(task, probs[idx], labels[idx], class_names), units,
                     names, resamples, seed)
    return {"method": "percentile bootstrap", "confidence": confidence, "resamples": int(resamples), "seed": seed,
            **units.describe(), "metrics": {name: _summary(point[name], values[name], confidence) for name in names}}


# ------------------------------------------------------------------------------------------------ predictions


def write_predictions(path: str, *, task: str, dataset: str, class_names, probs, labels, images, patients) -> str:
    """The per-image test predictions, atomically (a temporary file renamed into place): probs (N, K), labels,
    images (paths relative to the dataset root), patients ('' where none), class_names, task, dataset."""
    arrays = {"probs": np.asarray(probs, np.float64), "labels": np.asarray(labels),
              "images": np.asarray([str(i) for i in images], dtype=str),
              "patients": np.asarray(["" if p is None else str(p) for p in patients], dtype=str),
              "class_names": np.asarray([str(c) for c in class_names], dtype=str),
              "task": np.asarray(task), "dataset": np.asarray(dataset)}
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    return path


def read_predictions(path: str) -> dict:
    """A `test_predictions.npz` as a dict (BootstrapError naming the file and field when it is missing or bad)."""
    if not os.path.isfile(path):
        raise BootstrapError(f"{path}: no such file; the run's test predictions are written by medjax.train at the "
                             "end of a run with a test split")
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - any unreadable archive is reported with the file
        raise BootstrapError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    for field in ("probs", "labels", "images", "patients", "class_names", "task"):
        if field not in out:
            raise BootstrapError(f"{path}: field {field!r} is missing; expected a medjax {PREDICTIONS_FILE}")
    n = len(out["probs"])
    if out["probs"].ndim != 2 or out["probs"].shape[1] != len(out["class_names"]):
        raise BootstrapError(f"{path}: field 'probs' has shape {out['probs'].shape}; expected (N, "
                             f"{len(out['class_names'])}) for the {len(out['class_names'])} class names")
    for field in ("labels", "images", "patients"):
        if len(out[field]) != n:
            raise BootstrapError(f"{path}: field {field!r} has {len(out[field])} rows; 'probs' has {n}")
    out["task"] = str(out["task"])
    out["dataset"] = str(out.get("dataset", ""))
    out["class_names"] = [str(c) for c in out["class_names"]]
    out["path"] = path
    return out


def test_records(dataset, num_predictions: int):
    """The test records the trainer's predictions belong to: the split in order, less the images that could not be
    read while loading (masked rows the evaluation dropped); None when they cannot be matched."""
    records = dataset.splits["test"]
    if len(records) != num_predictions:
        failed = {entry["image"] for entry in dataset.skipped_images}
        records = [r for r in records if dataset.relative(r.path) not in failed]
    return records if len(records) == num_predictions else None


def finish_test(config, dataset, probs, labels, workdir: str) -> dict | None:
    """At the end of a run (process 0): writes `test_predictions.npz` and returns the bootstrap record for
    metrics.json (None when config.bootstrap.resamples is 0)."""
    records = test_records(dataset, len(probs))
    if records is not None:
        images, patients = [dataset.relative(r.path) for r in records], [r.patient for r in records]
    else:  # cannot say which image each row is: no paths, image resampling
        images, patients = [""] * len(probs), [None] * len(probs)
    write_predictions(os.path.join(workdir, PREDICTIONS_FILE), task=dataset.task, dataset=dataset.name,
                      class_names=dataset.class_names, probs=probs, labels=labels, images=images, patients=patients)
    b = config.bootstrap
    if not b.resamples:
        return None
    out = bootstrap_metrics(dataset.task, probs, labels, dataset.class_names, patients, resamples=b.resamples,
                            seed=b.seed, confidence=b.confidence)
    out["predictions_file"] = PREDICTIONS_FILE
    if records is None:
        out["note"] += "; the predictions could not be matched to the test records, so images were resampled"
    return out


# ------------------------------------------------------------------------------------------------ comparison


def align(a: dict, b: dict) -> np.ndarray:
    """Indices into b's rows that put b in a's image order; BootstrapError when the runs' test sets differ."""
    name_a, name_b = a.get("path", "run A"), b.get("path", "run B")
    if a["task"] != b["task"] or list(a["class_names"]) != list(b["class_names"]):
        raise BootstrapError(f"{name_b}: task {b['task']} with classes {list(b['class_names'])} does not match "
                             f"{name_a}: task {a['task']} with classes {list(a['class_names'])}")
    ia, ib = [str(x) for x in a["images"]], [str(x) for x in b["images"]]
    if "" in ia or "" in ib:
        raise BootstrapError(f"{name_a if '' in ia else name_b}: field 'images' has rows without an image path, so "
                             "the two runs' predictions cannot be paired")
    if len(set(ia)) != len(ia) or len(set(ib)) != len(ib):
        raise BootstrapError(f"{name_a if len(set(ia)) != len(ia) else name_b}: field 'images' repeats an image")
    where = {p: i for i, p in enumerate(ib)}
    only_a, only_b = [p for p in ia if p not in where], sorted(set(ib) - set(ia))
    if only_a or only_b:
        first = only_a[0] if only_a else only_b[0]
        raise BootstrapError(f"{name_a} and {name_b} were not tested on the same images: {len(only_a)} only in A, "
                             f"{len(only_b)} only in B (first: {first}); a paired comparison needs the same test "
                             "split")
    order = np.asarray([where[p] for p in ia], np.int64)
    if not np.array_equal(np.asarray(a["labels"]), np.asarray(b["labels"])[order]):
        raise BootstrapError(f"{name_a} and {name_b}: the same images carry different labels (field 'labels'); "
                             "the runs read different label files or options")
    return order


def p_value(diffs: np.ndarray) -> float:
    """Two-sided bootstrap p-value of 'no difference' from the resampled differences (module docstring)."""
    n = len(diffs)
    tail = min(int(np.sum(diffs <= 0)), int(np.sum(diffs >= 0)))
    return float(min(1.0, 2.0 * (1 + tail) / (n + 1)))


def compare(a: dict, b: dict, *, resamples: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Paired bootstrap of two runs' predictions (read_predictions dicts) on the same test images: per scalar
    metric the value of each run, the difference A - B with its percentile interval and p-value."""
    _check(resamples, confidence)
    order = align(a, b)
    canonical = np.argsort(np.asarray([str(x) for x in a["images"]]), kind="stable")  # resamples: by image path
    order = order[canonical]
    task, names_ = a["task"], a["class_names"]
    pa, la = np.asarray(a["probs"], np.float64)[canonical], np.asarray(a["labels"])[canonical]
    pb = np.asarray(b["probs"], np.float64)[order]
    pat_a = [str(x) for x in np.asarray(a["patients"])[canonical]]
    pat_b = [str(x) for x in np.asarray(b["patients"])[order]]
    patients = pat_a if pat_a == pat_b else None  # disagreeing ids: fall back to images, and say so
    units = Units(patients if patients is not None else None, n=len(pa))
    point_a = metrics_lib.compute_metrics(task, pa, la, names_)
    point_b = metrics_lib.compute_metrics(task, pb, la, names_)
    names = [n for n in scalar_metric_names(point_a) if n in scalar_metric_names(point_b)]

    def both(idx):
        ma = metrics_lib.compute_metrics(task, pa[idx], la[idx], names_)
        mb = metrics_lib.compute_metrics(task, pb[idx], la[idx], names_)
        return {n: (None if ma[n] is None or mb[n] is None else ma[n] - mb[n]) for n in names}

    diffs = _values(both, units, names, resamples, seed)
    rows = {}
    for n in names:
        d = diffs[n]
        point = None if point_a[n] is None or point_b[n] is None else point_a[n] - point_b[n]
        entry = _summary(point, d, confidence)
        defined = d[~np.isnan(d)]
        rows[n] = {"a": point_a[n], "b": point_b[n], "difference": point, "low": entry["low"],
                   "high": entry["high"], "p_value": p_value(defined) if len(defined) else None,
                   "undefined_resamples": entry["undefined_resamples"]}
    info = units.describe()
    if patients is None and any(pat_a) and pat_a != pat_b:
        info["note"] = "the runs' patient ids differ, so images were resampled"
    return {"method": "paired percentile bootstrap", "difference": "A - B", "confidence": confidence,
            "resamples": int(resamples), "seed": seed, "task": task, **info, "metrics": rows}


def fmt_interval(entry: dict | None, digits: int = 3) -> str:
    """'0.912 (0.894–0.930)' from a metrics entry; '—' when undefined."""
    if not entry or entry.get("value") is None:
        return "—"
    text = f"{entry['value']:.{digits}f}"
    if entry.get("low") is not None and not math.isnan(entry["low"]):
        text += f" ({entry['low']:.{digits}f}–{entry['high']:.{digits}f})"
    return text
