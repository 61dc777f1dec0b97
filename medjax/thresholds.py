"""Per-class operating points of a multi-label model, chosen on the validation split (calibrated operating points are
what TorchXRayVision users ask for: mlmed/torchxrayvision #151, #175).

`config.thresholds` names the rule; a class is predicted positive when its probability is >= its threshold:
- "youden" (default): the threshold maximising Youden's J = sensitivity + specificity - 1 = TPR(t) - FPR(t) over the
  class's validation scores (every distinct score is a candidate); ties go to the highest threshold (fewest false
  positives);
- "sensitivity:S" (0 < S <= 1): the highest threshold whose validation sensitivity is at least S, i.e. the most
  specific operating point that keeps that sensitivity.
A class whose validation labels are all 0 or all 1 has no operating point: it keeps 0.5 and the reason is recorded.

The trainer writes the points into the best model's folder (`best/step_<N>/thresholds.json`, atomically, when that
model is saved and so before the checkpoint that names it) and reports the test metrics at them beside the metrics at
0.5 (`metrics.json`: `thresholds`, `test.at_thresholds`); `medjax.predict` uses them for its `pred/<class>` columns,
and `medjax.export` carries them.
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np

from medjax.schema import ConfigError

FILE = "thresholds.json"
DEFAULT = 0.5
MULTILABEL = "multilabel"


class ThresholdError(ConfigError):
    """`config.thresholds` is not a rule this module knows, or a stored thresholds file is unreadable."""


def parse_rule(rule: str) -> tuple[str, float | None]:
    """'youden' -> ('youden', None); 'sensitivity:0.9' -> ('sensitivity', 0.9)."""
    rule = str(rule).strip()
    if rule == "youden":
        return "youden", None
    kind, _, value = rule.partition(":")
    if kind == "sensitivity":
        try:
            target = float(value)
        except ValueError:
            target = math.nan
        if 0 < target <= 1:
            return "sensitivity", target
    raise ThresholdError(f"config field thresholds={rule!r}: expected 'youden' or 'sensitivity:S' with 0 < S <= 1 "
                         "(e.g. 'sensitivity:0.9')")


def _operating_curve(labels, scores):
    """(thresholds in decreasing order, true positives, false positives) at `scores >= t` for every distinct score t."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, np.float64)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last row of each group of tied scores
    tp = np.cumsum(y)[last]
    return s[last], tp, (last + 1) - tp


def youden_point(labels, scores) -> tuple[float, float]:
    """(threshold, J) maximising J = TPR - FPR; the highest threshold among ties. Needs both label values."""
    t, tp, fp = _operating_curve(labels, scores)
    pos, neg = tp[-1], fp[-1]
    j = tp / pos - fp / neg
    best = int(np.argmax(j))  # first maximum in decreasing threshold order: the highest threshold
    return float(t[best]), float(j[best])


def sensitivity_point(labels, scores, target: float) -> float:
    """The highest threshold whose sensitivity (TPR) is >= target. Needs a positive label."""
    t, tp, _ = _operating_curve(labels, scores)
    reached = tp >= target * tp[-1] - 1e-9
    return float(t[int(np.argmax(reached))])


def choose(probs, labels, class_names, rule: str = "youden") -> dict:
    """The operating point of every class from validation probabilities (N, K) and 0/1 labels (N, K), with the
    validation metrics at those points: {'rule', 'class_names', 'thresholds': {class: t}, 'undefined': {class:
    reason}, 'val': thresholded_metrics(...)}."""
    kind, target = parse_rule(rule)
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels).astype(np.int64)
    points, undefined = {}, {}
    for c, name in enumerate(class_names):
        y = labels[:, c]
        if y.min() == y.max():
            points[name] = DEFAULT
            undefined[name] = (f"every validation label is {int(y[0])}: no operating point, {DEFAULT} kept")
        elif kind == "youden":
            points[name] = youden_point(y, probs[:, c])[0]
        else:
            points[name] = sensitivity_point(y, probs[:, c], target)
    values = np.asarray([points[n] for n in class_names])
    return {"rule": str(rule), "class_names": list(class_names), "thresholds": points, "undefined": undefined,
            "val": thresholded_metrics(probs, labels, class_names, values)}


def thresholded_metrics(probs, labels, class_names, thresholds) -> dict:
    """Multi-label metrics at per-class thresholds (`probs >= thresholds`): subset accuracy and macro precision /
    recall (sensitivity) / F1 / specificity over all classes (a zero denominator gives 0.0, as in medjax.metrics), and
    the same per class with the support."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels).astype(np.int64)
    thresholds = np.broadcast_to(np.asarray(thresholds, np.float64), (probs.shape[1],))
    pred = (probs >= thresholds).astype(np.int64)
    tp = (pred * labels).sum(axis=0).astype(np.float64)
    fp = (pred * (1 - labels)).sum(axis=0).astype(np.float64)
    support = labels.sum(axis=0)
    negatives = (1 - labels).sum(axis=0)
    div = lambda a, b: np.divide(a, b, out=np.zeros_like(a, np.float64), where=np.asarray(b) != 0)  # noqa: E731
    precision, recall = div(tp, tp + fp), div(tp, support.astype(np.float64))
    f1 = div(2 * tp, (support + tp + fp).astype(np.float64))
    specificity = div(negatives - fp, negatives.astype(np.float64))
    return {
        "thresholds": {n: float(t) for n, t in zip(class_names, thresholds)},
        "subset_accuracy": float(np.mean(np.all(pred == labels, axis=1))),
        "precision_macro": float(precision.mean()), "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()), "specificity_macro": float(specificity.mean()),
        "per_class": {n: {"precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
                          "specificity": float(specificity[c]), "support": int(support[c])}
                      for c, n in enumerate(class_names)},
    }


def as_array(points: dict | None, class_names) -> np.ndarray:
    """The thresholds of `class_names` in order from a `choose` result; 0.5 everywhere when there is none."""
    if not points:
        return np.full(len(class_names), DEFAULT)
    missing = [n for n in class_names if n not in points["thresholds"]]
    if missing:
        raise ThresholdError(f"the stored operating points have no class {missing[0]!r}; they are for "
                             f"{list(points['thresholds'])}")
    return np.asarray([points["thresholds"][n] for n in class_names], np.float64)


# ------------------------------------------------------------------------------------------------ on disk


def save(best_dir: str, points: dict, step: int | None = None) -> str:
    path = os.path.join(best_dir, FILE)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({**points, "best_step": step}, f, indent=1)
    os.replace(tmp, path)
    return path


def load(best_dir: str) -> dict | None:
    """The operating points stored with a best model, or None (a multi-class run, or a run from before them)."""
    path = os.path.join(best_dir, FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            points = json.load(f)
        points["thresholds"] = {str(k): float(v) for k, v in points["thresholds"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ThresholdError(f"{path}: not a thresholds file ({type(e).__name__}: {e}); remove it or train again") \
            from None
    return points


# ------------------------------------------------------------------------------------------------ trainer hooks


def save_for_best(best_dir: str, rule: str, dataset, probs, labels, step: int | None = None) -> None:
    """When a new best model is saved: its operating points from the validation probabilities (multi-label only;
    process 0 writes)."""
    if dataset.task != MULTILABEL or jax.process_index() != 0:
        return
    save(best_dir, choose(probs, labels, dataset.class_names, rule), step)


def report(result: dict, best_dir: str, test=None) -> None:
    """metrics.json: the best model's operating points (`thresholds`, with the validation metrics at them) and the
    test metrics at them (`test.at_thresholds`, from the test (probs, labels)) beside those at 0.5."""
    points = load(best_dir)
    if points is None:
        return
    result["thresholds"] = points
    if test is not None and "test" in result:
        probs, labels = test
        result["test"]["at_thresholds"] = thresholded_metrics(probs, labels, points["class_names"],
                                                              as_array(points, points["class_names"]))
