"""Evaluation metrics (SPEC section 7), in plain numpy, computed on the host from gathered predictions.

Every value agrees with scikit-learn (the test reference, `tests/test_metrics.py`); scikit-learn is not
needed at runtime. All returned values are JSON-serialisable: python floats / ints / strings / lists /
dicts, and `None` for a metric that is undefined on the evaluated split.

Undefined values are reported, never substituted (the reference study silently used 0.5):

- ROC-AUC of a class whose labels in the split have a single value (and AP of a class with no positive)
  is `None` in the per-class dict, is left out of the mean, and the class is listed in
  `"undefined_classes"` (name -> reason). A mean over no defined class is `None`.
- Multi-class ROC-AUC (one-vs-one macro) with a class absent from the labels: the pairs involving that
  class are undefined and left out (the macro average runs over the pairs of classes present, which is
  scikit-learn's `roc_auc_score(multi_class='ovo', labels=range(K))`; without `labels` scikit-learn
  raises, scikit-learn#19394). With fewer than two classes present ROC-AUC is `None`.
- A metric that is undefined as a whole is `None` and listed in `"undefined_metrics"` (name -> reason).
- Precision / recall / F1 with a zero denominator are 0.0, as scikit-learn's default
  `zero_division="warn"` (which warns and uses 0); the classes concerned are listed in `"zero_division"`
  instead of warning.
"""

from __future__ import annotations

import math

import numpy as np

MULTICLASS = "multiclass"
MULTILABEL = "multilabel"

# target-metric name -> key in the metrics dict, per task
_TARGETS = {
    MULTICLASS: {
        "roc_auc": "roc_auc",
        "balanced_accuracy": "balanced_accuracy",
        "quadratic_kappa": "quadratic_kappa",
        "accuracy": "accuracy",
    },
    MULTILABEL: {
        "mean_auc": "mean_auc",
        "map": "map",
        "accuracy": "subset_accuracy",
    },
}
TARGET_METRICS = ("roc_auc", "mean_auc", "balanced_accuracy", "quadratic_kappa", "accuracy", "map")


# ----------------------------------------------------------------------------------------------------
# helpers


def _float(x):
    """python float, or None for None / NaN."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _safe_div(num, den):
    """num / den elementwise, 0.0 where den == 0 (scikit-learn's default zero_division)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _check_probs(probs, class_names):
    probs = np.asarray(probs)
    if probs.ndim != 2:
        raise ValueError(f"probs must have shape (N, K), got {probs.shape}")
    if probs.shape[0] == 0:
        raise ValueError("no samples to evaluate (N = 0)")
    class_names = [str(c) for c in class_names]
    if probs.shape[1] != len(class_names):
        raise ValueError(f"probs has {probs.shape[1]} columns but {len(class_names)} class names were given")
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class names must be unique, got {class_names}")
    probs = probs.astype(np.float64)  # exact for float16/32 inputs: ties are preserved
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contain NaN or inf (diverged model?)")
    return probs, class_names


def _as_int_labels(labels, what):
    labels = np.asarray(labels)
    if labels.dtype == bool:
        return labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.number):
        raise ValueError(f"{what} must be numeric, got dtype {labels.dtype}")
    if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
        raise ValueError(f"{what} must be integers")
    return labels.astype(np.int64)


def _average_ranks(x):
    """1-based ranks of x with ties given their average rank (as scipy.stats.rankdata 'average')."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new = np.empty(len(xs), dtype=bool)
    new[0] = True
    np.not_equal(xs[1:], xs[:-1], out=new[1:])
    group = np.cumsum(new) - 1  # tie-group index of each sorted element
    ends = np.append(np.flatnonzero(new)[1:], len(xs))  # 1-based rank of each group's last element
    starts = np.flatnonzero(new) + 1  # 1-based rank of each group's first element
    ranks = np.empty(len(xs), dtype=np.float64)
    ranks[order] = ((starts + ends) / 2.0)[group]
    return ranks


def binary_roc_auc(y_true, score):
    """ROC-AUC of a binary {0,1} target, or None if y_true has a single value.

    Rank-based (Mann-Whitney U with average ranks for ties), which equals the trapezoidal area under the
    ROC curve that scikit-learn integrates (a tie counts one half).
    """
    y = np.asarray(y_true).astype(bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(np.asarray(score, dtype=np.float64))
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def binary_average_precision(y_true, score):
    """Average precision as scikit-learn's `average_precision_score`, or None without positive.

    AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds in decreasing order (the step
    function, no interpolation); tied scores form one threshold.
    """
    y = np.asarray(y_true).astype(np.float64)
    if not np.any(y > 0):
        return None
    s = np.asarray(score, dtype=np.float64)
    order = np.argsort(s, kind="mergesort")[::-1]  # scikit-learn's ordering
    s, y = s[order], y[order]
    last_of_threshold = np.r_[np.flatnonzero(np.diff(s)), len(y) - 1]
    tps = np.cumsum(y)[last_of_threshold]
    fps = 1 + last_of_threshold - tps
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _confusion(labels, pred, k):
    return np.bincount(labels * k + pred, minlength=k * k).reshape(k, k)


def _kappa(cm, weights):
    """Cohen's kappa from a confusion matrix (scikit-learn's formula); None when undefined (0 / 0)."""
    cm = cm.astype(np.float64)
    k = cm.shape[0]
    n = cm.sum()
    expected = np.outer(cm.sum(axis=1), cm.sum(axis=0)) / n
    idx = np.arange(k)
    if weights == "quadratic":
        w = (idx[:, None] - idx[None, :]).astype(np.float64) ** 2
    else:
        w = 1.0 - np.eye(k)
    den = np.sum(w * expected)
    if den == 0:
        return None
    return float(1.0 - np.sum(w * cm) / den)


# ----------------------------------------------------------------------------------------------------
# multi-class


def multiclass_metrics(probs, labels, class_names) -> dict:
    """Multi-class (and binary) metrics from softmax probabilities `probs` (N, K) and labels (N,) in [0, K).

    Prediction = argmax of probs (first maximum on ties).
    - accuracy.
    - precision_macro / recall_macro / f1_macro: averaged over the classes present in labels or
      predictions (scikit-learn's default `labels=None`); a zero denominator gives 0.0 (scikit-learn's
      default zero_division), listed under "zero_division".
    - precision_weighted / recall_weighted / f1_weighted: the per-class values averaged with the classes'
      true counts as weights (scikit-learn's `average='weighted'`, the glioma study's metrics; recall_weighted
      equals accuracy).
    - balanced_accuracy: recall averaged over the classes present in labels (scikit-learn's
      `balanced_accuracy_score`).
    - cohen_kappa (unweighted) and quadratic_kappa (weights (i - j)^2 over all K classes, i.e.
      scikit-learn with `labels=range(K)`); None when undefined (only one class in common).
    - roc_auc: binary (K = 2) on probs[:, 1]; K > 2: one-vs-one macro over pairs of classes present in
      labels (scikit-learn `multi_class='ovo', average='macro'`); None with fewer than two classes present.
    - confusion_matrix: K x K, rows = true class, columns = predicted class.
    - per_class: precision / recall / f1 / support per class name (None for a class absent from both
      labels and predictions, which takes no part in the macro averages).
    """
    probs, class_names = _check_probs(probs, class_names)
    n, k = probs.shape
    if k < 2:
        raise ValueError(f"multi-class metrics need at least 2 classes, got {k}")
    labels = _as_int_labels(labels, "labels")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"labels must lie in [0, {k}), got range [{labels.min()}, {labels.max()}]")

    pred = np.argmax(probs, axis=1)
    cm = _confusion(labels, pred, k)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)  # true count per class
    predicted = cm.sum(axis=0)
    in_labels = support > 0
    seen = in_labels | (predicted > 0)  # scikit-learn's labels=None: union of y_true and y_pred

    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * tp, support + predicted)  # = 2PR / (P + R), scikit-learn >= 1.3

    undefined_classes = {}
    undefined_metrics = {}
    for c in np.flatnonzero(~in_labels):
        reason = "no sample of this class in the labels"
        reason += (
            ": left out of the macro averages, balanced accuracy and ROC-AUC"
            if not seen[c]
            else " (but predicted): recall 0 in recall/F1 macro, left out of balanced accuracy and ROC-AUC"
        )
        undefined_classes[class_names[c]] = reason

    def names(mask):
        return [class_names[c] for c in np.flatnonzero(mask & seen)]

    zero_division = {
        key: v
        for key, v in (("precision", names(predicted == 0)), ("recall", names(support == 0)),
                       ("f1", names(support + predicted == 0)))
        if v
    }

    # ROC-AUC
    present = np.flatnonzero(in_labels)
    if len(present) < 2:
        roc_auc = None
        undefined_metrics["roc_auc"] = (
            f"only one class ({class_names[present[0]]}) present in the labels: ROC-AUC is not defined"
        )
    elif k == 2:
        roc_auc = binary_roc_auc(labels == 1, probs[:, 1])
    else:
        pair_scores = []
        for i, a in enumerate(present):
            for b in present[i + 1 :]:
                mask = (labels == a) | (labels == b)
                la = labels[mask]
                auc_a = binary_roc_auc(la == a, probs[mask, a])
                auc_b = binary_roc_auc(la == b, probs[mask, b])
                pair_scores.append((auc_a + auc_b) / 2.0)
        roc_auc = float(np.mean(pair_scores))

    cohen = _kappa(cm, None)
    qwk = _kappa(cm, "quadratic")
    for key, v in (("cohen_kappa", cohen), ("quadratic_kappa", qwk)):
        if v is None:
            undefined_metrics[key] = "labels and predictions have only one class in common: kappa is 0 / 0"

    per_class = {}
    for c, name in enumerate(class_names):
        per_class[name] = {
            "precision": float(precision[c]) if seen[c] else None,
            "recall": float(recall[c]) if seen[c] else None,
            "f1": float(f1[c]) if seen[c] else None,
            "support": int(support[c]),
        }

    return {
        "task": MULTICLASS,
        "num_samples": int(n),
        "class_names": list(class_names),
        "accuracy": float(np.mean(pred == labels)),
        "precision_macro": float(np.mean(precision[seen])),
        "recall_macro": float(np.mean(recall[seen])),
        "f1_macro": float(np.mean(f1[seen])),
        "precision_weighted": float(np.sum(precision * support) / n),
        "recall_weighted": float(np.sum(recall * support) / n),
        "f1_weighted": float(np.sum(f1 * support) / n),
        "balanced_accuracy": float(np.mean(recall[in_labels])),
        "cohen_kappa": cohen,
        "quadratic_kappa": qwk,
        "roc_auc": roc_auc,
        "confusion_matrix": cm.astype(int).tolist(),
        "per_class": per_class,
        "undefined_classes": undefined_classes,
        "undefined_metrics": undefined_metrics,
        "zero_division": zero_division,
    }


# ----------------------------------------------------------------------------------------------------
# multi-label


def multilabel_metrics(probs, labels, class_names, threshold=0.5) -> dict:
    """Multi-label metrics from sigmoid probabilities `probs` (N, K) and binary labels (N, K).

    - roc_auc_per_class / mean_auc: ROC-AUC per class; None for a class whose labels are all 0 or all 1,
      left out of the mean (None if no class has one); such classes are listed in "undefined_classes".
    - ap_per_class / map: average precision per class (scikit-learn's step-function AP); None for a class
      with no positive, left out of the mean.
    - thresholded at `probs >= threshold`: subset_accuracy (exact match of the whole label vector),
      precision_macro / recall_macro / f1_macro over all K classes (scikit-learn's multilabel macro
      average; zero denominators give 0.0, listed under "zero_division").
    """
    probs, class_names = _check_probs(probs, class_names)
    n, k = probs.shape
    labels = _as_int_labels(labels, "labels")
    if labels.shape != (n, k):
        raise ValueError(f"labels must have shape ({n}, {k}), got {labels.shape}")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError("multi-label labels must be 0 or 1 (map uncertain / missing labels first)")

    auc_per_class, ap_per_class = {}, {}
    undefined_classes = {}
    undefined_metrics = {}
    for c, name in enumerate(class_names):
        y = labels[:, c]
        n_pos = int(y.sum())
        auc_per_class[name] = binary_roc_auc(y, probs[:, c])
        ap_per_class[name] = binary_average_precision(y, probs[:, c])
        if n_pos == 0:
            undefined_classes[name] = ("no positive label in this split: ROC-AUC and AP undefined, left out of "
                                       "mean_auc and map")
        elif n_pos == n:
            undefined_classes[name] = ("no negative label in this split: ROC-AUC undefined, left out of mean_auc "
                                       "(AP is defined)")

    aucs = [v for v in auc_per_class.values() if v is not None]
    aps = [v for v in ap_per_class.values() if v is not None]
    mean_auc = float(np.mean(aucs)) if aucs else None
    mean_ap = float(np.mean(aps)) if aps else None
    if mean_auc is None:
        undefined_metrics["mean_auc"] = "no class has both positive and negative labels in this split"
    if mean_ap is None:
        undefined_metrics["map"] = "no class has a positive label in this split"

    pred = (probs >= threshold).astype(np.int64)
    tp = np.sum(pred * labels, axis=0).astype(np.float64)
    predicted = pred.sum(axis=0)
    support = labels.sum(axis=0)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * tp, support + predicted)
    zero_division = {
        key: [class_names[c] for c in np.flatnonzero(mask)]
        for key, mask in (("precision", predicted == 0), ("recall", support == 0), ("f1", support + predicted == 0))
        if np.any(mask)
    }
    per_class = {
        name: {"precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
               "support": int(support[c])}
        for c, name in enumerate(class_names)
    }

    return {
        "task": MULTILABEL,
        "num_samples": int(n),
        "class_names": list(class_names),
        "threshold": float(threshold),
        "roc_auc_per_class": auc_per_class,
        "mean_auc": mean_auc,
        "num_auc_classes": len(aucs),
        "ap_per_class": ap_per_class,
        "map": mean_ap,
        "num_ap_classes": len(aps),
        "subset_accuracy": float(np.mean(np.all(pred == labels, axis=1))),
        "precision_macro": float(np.mean(precision)),
        "recall_macro": float(np.mean(recall)),
        "f1_macro": float(np.mean(f1)),
        "per_class": per_class,
        "undefined_classes": undefined_classes,
        "undefined_metrics": undefined_metrics,
        "zero_division": zero_division,
    }


# ----------------------------------------------------------------------------------------------------
# dispatch


def compute_metrics(task, probs, labels, class_names, **kwargs) -> dict:
    """`multiclass_metrics` or `multilabel_metrics` by task ('multiclass' | 'multilabel')."""
    if task == MULTICLASS:
        return multiclass_metrics(probs, labels, class_names, **kwargs)
    if task == MULTILABEL:
        return multilabel_metrics(probs, labels, class_names, **kwargs)
    raise ValueError(f"unknown task {task!r}; expected {MULTICLASS!r} or {MULTILABEL!r}")


def target_metric(name, metrics):
    """The model-selection metric `name` from a `compute_metrics` dict: float, or None when undefined.

    Names: multi-class 'roc_auc', 'balanced_accuracy', 'quadratic_kappa', 'accuracy'; multi-label
    'mean_auc', 'map', 'accuracy' (subset accuracy). None means undefined on this split (e.g. a single
    class present), never a 0.5 stand-in: the caller must not rank it as a score.
    """
    return _float(metrics[target_key(name, metrics.get("task"))])


def target_key(name, task) -> str:
    """The key of target metric `name` in a `task` metrics dict ('accuracy' -> 'subset_accuracy' for multi-label)."""
    check_target(name, task)
    return _TARGETS[task][name]


def check_target(name, task) -> None:
    """Raises ValueError (naming the choices) unless `name` is a target / selection metric of `task`."""
    if name not in TARGET_METRICS:
        raise ValueError(f"unknown target metric {name!r}; expected one of {TARGET_METRICS}")
    if task not in _TARGETS:
        raise ValueError(f"metrics dict has no valid 'task' (got {task!r})")
    table = _TARGETS[task]
    if name not in table:
        hint = {"roc_auc": "mean_auc", "mean_auc": "roc_auc"}.get(name)
        raise ValueError(
            f"target metric {name!r} does not apply to a {task} task; available: {sorted(table)}"
            + (f" (did you mean {hint!r}?)" if hint in table else "")
        )
