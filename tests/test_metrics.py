"""medjax.metrics against scikit-learn (the reference; SPEC section 7)."""

import json
import warnings

import numpy as np
import pytest

sk_m = pytest.importorskip("sklearn.metrics")

from medjax.metrics import (  # noqa: E402
    binary_average_precision,
    binary_roc_auc,
    compute_metrics,
    multiclass_metrics,
    multilabel_metrics,
    target_metric,
)

TOL = 1e-10
SEEDS = (0, 1, 2)


def names(k):
    return [f"c{i}" for i in range(k)]


def tied_probs(rng, n, k):
    """Row-normalised small integer counts: probabilities that sum to 1 with many exact ties."""
    counts = rng.integers(0, 4, size=(n, k)).astype(np.float64)
    counts[np.arange(n), rng.integers(0, k, size=n)] += 1  # no all-zero row
    return counts / counts.sum(axis=1, keepdims=True)


def smooth_probs(rng, n, k):
    z = rng.normal(size=(n, k))
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def informative_labels(rng, probs):
    """Labels correlated with probs so AUC / kappa are away from chance."""
    k = probs.shape[1]
    noisy = probs + rng.uniform(0, 0.6, size=probs.shape)
    return np.argmax(noisy, axis=1) % k


def sk(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def close(a, b):
    assert a is not None and b is not None, (a, b)
    assert abs(a - b) <= TOL, (a, b)


def check_multiclass_against_sklearn(probs, labels, k):
    m = multiclass_metrics(probs, labels, names(k))
    pred = probs.argmax(axis=1)
    close(m["accuracy"], sk_m.accuracy_score(labels, pred))
    close(m["precision_macro"], sk(sk_m.precision_score, labels, pred, average="macro"))
    close(m["recall_macro"], sk(sk_m.recall_score, labels, pred, average="macro"))
    close(m["f1_macro"], sk(sk_m.f1_score, labels, pred, average="macro"))
    close(m["precision_weighted"], sk(sk_m.precision_score, labels, pred, average="weighted"))
    close(m["recall_weighted"], sk(sk_m.recall_score, labels, pred, average="weighted"))
    close(m["f1_weighted"], sk(sk_m.f1_score, labels, pred, average="weighted"))
    close(m["balanced_accuracy"], sk(sk_m.balanced_accuracy_score, labels, pred))
    close(m["cohen_kappa"], sk_m.cohen_kappa_score(labels, pred))
    close(m["quadratic_kappa"], sk_m.cohen_kappa_score(labels, pred, weights="quadratic", labels=list(range(k))))
    if k == 2:
        close(m["roc_auc"], sk_m.roc_auc_score(labels, probs[:, 1]))
    else:
        ref = sk_m.roc_auc_score(labels, probs, multi_class="ovo", average="macro", labels=list(range(k)))
        close(m["roc_auc"], ref)
    assert m["confusion_matrix"] == sk_m.confusion_matrix(labels, pred, labels=list(range(k))).tolist()
    p, r, f, s = sk(sk_m.precision_recall_fscore_support, labels, pred, labels=list(range(k)), zero_division=0)
    for c in range(k):
        pc = m["per_class"][f"c{c}"]
        assert pc["support"] == s[c]
        if pc["precision"] is not None:
            close(pc["precision"], p[c])
            close(pc["recall"], r[c])
            close(pc["f1"], f[c])
    return m



@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [2, 5, 8])
@pytest.mark.parametrize("ties", [False, True])
def test_multiclass_matches_sklearn(seed, k, ties):
    rng = np.random.default_rng(seed * 100 + k)
    n = 400
    probs = tied_probs(rng, n, k) if ties else smooth_probs(rng, n, k)
    if k == 2 and ties:
        p1 = np.round(rng.uniform(size=n), 1)  # heavy ties in the scored column
        probs = np.stack([1 - p1, p1], axis=1)
    labels = informative_labels(rng, probs)
    if ties:
        assert len(np.unique(probs[:, 1])) < n // 4
    m = check_multiclass_against_sklearn(probs, labels, k)
    assert m["undefined_classes"] == {} and m["undefined_metrics"] == {}
    assert 0.5 < m["roc_auc"] <= 1.0


@pytest.mark.parametrize("seed", SEEDS)
def test_multiclass_missing_class(seed):
    """A 5-class split without class 3: OvO over present pairs (sklearn with labels=), no crash."""
    rng = np.random.default_rng(seed)
    k, n = 5, 300
    probs = tied_probs(rng, n, k)
    labels = informative_labels(rng, probs)
    labels[labels == 3] = 1
    with pytest.raises(ValueError):  # scikit-learn#19394: roc_auc_score without labels= crashes
        sk_m.roc_auc_score(labels, probs, multi_class="ovo")
    m = check_multiclass_against_sklearn(probs, labels, k)
    assert "c3" in m["undefined_classes"] and len(m["undefined_classes"]) == 1
    assert m["per_class"]["c3"]["support"] == 0
    assert m["roc_auc"] is not None
    # and equal to averaging the pairs over the present classes only
    present = [0, 1, 2, 4]
    pairs = []
    for i, a in enumerate(present):
        for b in present[i + 1 :]:
            mask = (labels == a) | (labels == b)
            pairs.append(
                (sk_m.roc_auc_score(labels[mask] == a, probs[mask, a]) + sk_m.roc_auc_score(labels[mask] == b,
                                                                                            probs[mask, b])) / 2
            )
    close(m["roc_auc"], float(np.mean(pairs)))


def test_multiclass_class_absent_everywhere():
    """Class never in labels nor predicted: excluded from the macro averages, as sklearn's labels=None."""
    rng = np.random.default_rng(7)
    k, n = 5, 200
    probs = smooth_probs(rng, n, k)
    probs[:, 4] = 0.0
    probs /= probs.sum(axis=1, keepdims=True)
    labels = informative_labels(rng, probs)
    labels[labels == 4] = 0
    m = check_multiclass_against_sklearn(probs, labels, k)
    assert m["per_class"]["c4"]["precision"] is None and "c4" in m["undefined_classes"]


def test_weighted_averages_with_a_class_predicted_but_absent():
    """Weighted P/R/F1 (the glioma study's metrics) against scikit-learn where the classes' weights matter: a class
    only predicted (weight 0, zero_division), a class never predicted (precision 0), very unequal supports."""
    rng = np.random.default_rng(11)
    k, n = 4, 250
    probs = smooth_probs(rng, n, k)
    labels = np.where(rng.uniform(size=n) < 0.8, 0, informative_labels(rng, probs))
    labels[labels == 3] = 2  # class 3 absent from the labels, but predicted
    probs[:, 1] *= 0.01  # class 1 (present) almost never predicted
    probs /= probs.sum(axis=1, keepdims=True)
    m = check_multiclass_against_sklearn(probs, labels, k)
    assert 3 in probs.argmax(axis=1) and "c3" in m["undefined_classes"]
    assert m["precision_weighted"] != m["precision_macro"]
    close(m["recall_weighted"], m["accuracy"])


def test_binary_single_class_split():
    rng = np.random.default_rng(3)
    probs = smooth_probs(rng, 50, 2)
    labels = np.zeros(50, dtype=int)
    m = multiclass_metrics(probs, labels, ["normal", "abnormal"])
    assert m["roc_auc"] is None and "roc_auc" in m["undefined_metrics"]
    assert "abnormal" in m["undefined_classes"]
    assert target_metric("roc_auc", m) is None
    assert np.isnan(sk(sk_m.roc_auc_score, labels, probs[:, 1]))  # sklearn: nan + warning
    close(m["balanced_accuracy"], sk(sk_m.balanced_accuracy_score, labels, probs.argmax(1)))
    json.dumps(m, allow_nan=False)


def test_kappa_undefined():
    probs = np.tile([[0.9, 0.05, 0.05]], (10, 1))
    labels = np.zeros(10, dtype=int)
    m = multiclass_metrics(probs, labels, names(3))
    assert np.isnan(sk(sk_m.cohen_kappa_score, labels, probs.argmax(1)))
    assert m["cohen_kappa"] is None and m["quadratic_kappa"] is None
    assert "quadratic_kappa" in m["undefined_metrics"] and target_metric("quadratic_kappa", m) is None
    assert m["accuracy"] == 1.0


def multilabel_data(rng, n, k, ties):
    logits = rng.normal(size=(n, k))
    labels = (logits + rng.normal(scale=1.5, size=(n, k)) > 0.8).astype(int)
    probs = 1 / (1 + np.exp(-logits))
    if ties:
        probs = np.round(probs, 1)
    return probs, labels


def check_multilabel_against_sklearn(probs, labels, m, threshold=0.5):
    k = labels.shape[1]
    pos = labels.sum(0)
    auc_ok = [c for c in range(k) if 0 < pos[c] < len(labels)]
    ap_ok = [c for c in range(k) if pos[c] > 0]
    for c in range(k):
        a, ap = m["roc_auc_per_class"][f"c{c}"], m["ap_per_class"][f"c{c}"]
        if c in auc_ok:
            close(a, sk_m.roc_auc_score(labels[:, c], probs[:, c]))
        else:
            assert a is None and f"c{c}" in m["undefined_classes"]
        if c in ap_ok:
            close(ap, sk_m.average_precision_score(labels[:, c], probs[:, c]))
        else:
            assert ap is None
    close(m["mean_auc"], sk_m.roc_auc_score(labels[:, auc_ok], probs[:, auc_ok], average="macro"))
    close(m["map"], sk_m.average_precision_score(labels[:, ap_ok], probs[:, ap_ok], average="macro"))
    assert m["num_auc_classes"] == len(auc_ok) and m["num_ap_classes"] == len(ap_ok)
    pred = (probs >= threshold).astype(int)
    close(m["subset_accuracy"], sk_m.accuracy_score(labels, pred))
    close(m["precision_macro"], sk(sk_m.precision_score, labels, pred, average="macro"))
    close(m["recall_macro"], sk(sk_m.recall_score, labels, pred, average="macro"))
    close(m["f1_macro"], sk(sk_m.f1_score, labels, pred, average="macro"))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [False, True])
def test_multilabel_matches_sklearn(seed, ties):
    rng = np.random.default_rng(seed)
    probs, labels = multilabel_data(rng, 500, 14, ties)
    m = multilabel_metrics(probs, labels, names(14))
    assert m["undefined_classes"] == {}
    check_multilabel_against_sklearn(probs, labels, m)
    # with every class defined, the means equal sklearn's macro over all 14 directly
    close(m["mean_auc"], sk_m.roc_auc_score(labels, probs, average="macro"))
    close(m["map"], sk_m.average_precision_score(labels, probs, average="macro"))


@pytest.mark.parametrize("seed", SEEDS)
def test_multilabel_single_value_classes(seed):
    rng = np.random.default_rng(seed + 10)
    probs, labels = multilabel_data(rng, 300, 14, ties=True)
    labels[:, 2] = 0  # no positive: no AUC, no AP
    labels[:, 9] = 1  # no negative: no AUC, AP defined (= 1)
    m = multilabel_metrics(probs, labels, names(14), threshold=0.4)
    assert set(m["undefined_classes"]) == {"c2", "c9"}
    assert m["roc_auc_per_class"]["c2"] is None and m["roc_auc_per_class"]["c9"] is None
    assert m["ap_per_class"]["c2"] is None
    close(m["ap_per_class"]["c9"], 1.0)
    assert m["num_auc_classes"] == 12 and m["num_ap_classes"] == 13
    check_multilabel_against_sklearn(probs, labels, m, threshold=0.4)
    # sklearn over all 14 columns gives nan: the undefined class must not be a silent 0.5
    assert np.isnan(sk(sk_m.roc_auc_score, labels, probs, average="macro"))
    assert target_metric("mean_auc", m) == m["mean_auc"]
    json.dumps(m, allow_nan=False)


def test_multilabel_no_defined_class():
    probs = np.full((4, 2), 0.3)
    m = multilabel_metrics(probs, np.zeros((4, 2), dtype=int), ["a", "b"])
    assert m["mean_auc"] is None and m["map"] is None
    assert target_metric("mean_auc", m) is None and target_metric("map", m) is None
    assert {"mean_auc", "map"} <= set(m["undefined_metrics"])
    json.dumps(m, allow_nan=False)


def test_binary_helpers_ties_exhaustive():
    """All-tied and extreme cases of the rank AUC / step AP."""
    rng = np.random.default_rng(5)
    for _ in range(20):
        n = int(rng.integers(2, 30))
        y = rng.integers(0, 2, size=n)
        s = rng.integers(0, 3, size=n).astype(float)
        if 0 < y.sum() < n:
            close(binary_roc_auc(y, s), sk_m.roc_auc_score(y, s))
        if y.sum() > 0:
            close(binary_average_precision(y, s), sk_m.average_precision_score(y, s))
    y = np.array([0, 1, 0, 1])
    assert binary_roc_auc(y, np.zeros(4)) == 0.5
    close(binary_average_precision(y, np.zeros(4)), sk_m.average_precision_score(y, np.zeros(4)))


def test_compute_metrics_dispatch_and_json():
    rng = np.random.default_rng(11)
    probs = smooth_probs(rng, 100, 5).astype(np.float32)  # device outputs are float32
    labels = informative_labels(rng, probs.astype(np.float64))
    m = compute_metrics("multiclass", probs, labels, names(5))
    check_multiclass_against_sklearn(probs.astype(np.float64), labels, 5)
    text = json.dumps(m, allow_nan=False)
    assert json.loads(text) == m
    for name in ("roc_auc", "balanced_accuracy", "quadratic_kappa", "accuracy"):
        v = target_metric(name, m)
        assert type(v) is float
    with pytest.raises(ValueError, match="mean_auc"):
        target_metric("mean_auc", m)

    mprobs, mlabels = multilabel_data(rng, 100, 14, ties=False)
    ml = compute_metrics("multilabel", mprobs.astype(np.float32), mlabels, names(14))
    assert json.loads(json.dumps(ml, allow_nan=False)) == ml
    for name in ("mean_auc", "map", "accuracy"):
        assert type(target_metric(name, ml)) is float
    assert target_metric("accuracy", ml) == ml["subset_accuracy"]
    with pytest.raises(ValueError, match="roc_auc"):
        target_metric("roc_auc", ml)
    with pytest.raises(ValueError):
        target_metric("f2", ml)
    with pytest.raises(ValueError):
        compute_metrics("regression", mprobs, mlabels, names(14))


def test_bad_inputs():
    probs = np.full((3, 2), 0.5)
    with pytest.raises(ValueError):
        multiclass_metrics(probs, [0, 1, 2], ["a", "b"])  # label out of range
    with pytest.raises(ValueError):
        multiclass_metrics(probs, [0, 1], ["a", "b"])  # length mismatch
    with pytest.raises(ValueError):
        multiclass_metrics(probs, [0, 1, 0], ["a", "b", "c"])  # class names mismatch
    with pytest.raises(ValueError):
        multiclass_metrics(np.array([[np.nan, 1.0]] * 3), [0, 1, 0], ["a", "b"])
    with pytest.raises(ValueError):
        multilabel_metrics(probs, np.array([[0, -1]] * 3), ["a", "b"])  # uncertain label not mapped
