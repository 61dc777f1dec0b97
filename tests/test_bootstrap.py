"""Bootstrap intervals of the test metrics and the paired comparison of two runs (medjax/bootstrap.py), against a
direct numpy implementation (bitwise, fixed seed), scipy.stats.bootstrap (percentile method, same resamples) and
scikit-learn; patient resampling checked against its definition."""

import os

import numpy as np
import pytest

from medjax import bootstrap, metrics

sk_m = pytest.importorskip("sklearn.metrics")
stats = pytest.importorskip("scipy.stats")

NAMES3 = ["a", "b", "c"]


def _multiclass(seed, n, k=3, skill=1.5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + skill * np.eye(k)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs, labels


def _reference_draws(units_of_images, resamples, seed):
    """The definition, written plainly: units in order of first appearance, rng.integers(0, U, U) per resample,
    each drawn unit contributes its images in split order."""
    members = {}
    for i, u in enumerate(units_of_images):
        members.setdefault(u, []).append(i)
    groups = list(members.values())
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        drawn = rng.integers(0, len(groups), len(groups))
        yield np.asarray([i for g in drawn for i in groups[g]], np.int64)


def _accuracy(probs, labels, idx):
    return float(np.mean(np.argmax(probs[idx], axis=1) == labels[idx]))


def test_scalar_metric_names_are_every_top_level_number():
    probs, labels = _multiclass(0, 50)
    m = metrics.compute_metrics("multiclass", probs, labels, NAMES3)
    assert bootstrap.scalar_metric_names(m) == [
        "accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_weighted", "recall_weighted",
        "f1_weighted", "balanced_accuracy", "cohen_kappa", "quadratic_kappa", "roc_auc"]
    ml = metrics.compute_metrics("multilabel", probs, (probs > 0.3).astype(int), NAMES3)
    assert bootstrap.scalar_metric_names(ml) == ["mean_auc", "map", "subset_accuracy", "precision_macro",
                                                 "recall_macro", "f1_macro"]


def test_image_intervals_equal_direct_numpy_bitwise():
    probs, labels = _multiclass(1, 120)
    out = bootstrap.bootstrap_metrics("multiclass", probs, labels, NAMES3, resamples=300, seed=7)
    assert (out["unit"], out["num_units"], out["resamples"], out["seed"]) == ("image", 120, 300, 7)
    ref = np.asarray([_accuracy(probs, labels, idx) for idx in _reference_draws(range(120), 300, 7)])
    acc = out["metrics"]["accuracy"]
    assert acc["value"] == _accuracy(probs, labels, np.arange(120))
    assert (acc["low"], acc["high"]) == tuple(np.quantile(ref, [0.025, 0.975]))  # bitwise
    assert acc["mean"] == ref.mean() and acc["std"] == ref.std(ddof=1) and acc["undefined_resamples"] == 0
    assert acc["low"] < acc["value"] < acc["high"]
    # recall_weighted is accuracy, computed another way: the same resamples give the same interval
    assert out["metrics"]["recall_weighted"]["low"] == pytest.approx(acc["low"], abs=1e-12)
    # the other metrics on the same resamples, recomputed with scikit-learn
    aucs, f1s = [], []
    for idx in _reference_draws(range(120), 300, 7):
        aucs.append(sk_m.roc_auc_score(labels[idx], probs[idx], multi_class="ovo", labels=[0, 1, 2]))
        f1s.append(sk_m.f1_score(labels[idx], probs[idx].argmax(1), average="weighted"))
    for name, values in (("roc_auc", aucs), ("f1_weighted", f1s)):
        low, high = np.quantile(values, [0.025, 0.975])
        assert out["metrics"][name]["low"] == pytest.approx(low, abs=1e-10), name
        assert out["metrics"][name]["high"] == pytest.approx(high, abs=1e-10), name


@pytest.mark.parametrize("batch", [None, 1, 7])
def test_intervals_equal_scipy_percentile_bootstrap(batch):
    """scipy.stats.bootstrap (method='percentile') given the same seeded generator draws the same resamples."""
    probs, labels = _multiclass(2, 90)
    out = bootstrap.bootstrap_metrics("multiclass", probs, labels, NAMES3, resamples=200, seed=3, confidence=0.9)
    for name in ("accuracy", "roc_auc", "quadratic_kappa"):
        def statistic(idx, name=name):
            return metrics.compute_metrics("multiclass", probs[idx], labels[idx], NAMES3)[name]

        ref = stats.bootstrap((np.arange(90),), statistic, vectorized=False, n_resamples=200, batch=batch,
                              method="percentile", confidence_level=0.9, rng=np.random.default_rng(3))
        got = out["metrics"][name]
        assert got["low"] == pytest.approx(ref.confidence_interval.low, abs=1e-12), name
        assert got["high"] == pytest.approx(ref.confidence_interval.high, abs=1e-12), name
        assert got["std"] == pytest.approx(ref.standard_error, rel=1e-12), name
        assert got["mean"] == pytest.approx(np.mean(ref.bootstrap_distribution), rel=1e-12), name


def test_patient_resampling_follows_its_definition():
    rng = np.random.default_rng(4)
    n = 150
    probs, labels = _multiclass(4, n)
    patients = [f"p{int(i)}" for i in rng.integers(0, 40, n)]
    patients[5] = None  # an image without an id is its own unit
    out = bootstrap.bootstrap_metrics("multiclass", probs, labels, NAMES3, patients, resamples=250, seed=11)
    keys = [("patient", p) if p is not None else ("image", i) for i, p in enumerate(patients)]
    num_units = len(set(keys))
    assert out["unit"] == "patient" and out["num_units"] == num_units and out["num_images"] == n
    assert "patients resampled, not images" in out["note"] and "1 image(s) without a patient id" in out["note"]
    ref = np.asarray([_accuracy(probs, labels, idx) for idx in _reference_draws(keys, 250, 11)])
    assert (out["metrics"]["accuracy"]["low"], out["metrics"]["accuracy"]["high"]) == tuple(
        np.quantile(ref, [0.025, 0.975]))
    # a drawn patient brings every one of its images, as many times as it was drawn
    units = bootstrap.Units(patients)
    drawn = np.random.default_rng(0).integers(0, units.num_units, units.num_units)
    idx = units.expand(drawn)
    assert len(idx) == units.counts[drawn].sum()
    for u in np.unique(drawn):
        images = np.flatnonzero(units.unit_of == u)
        assert np.sum(np.isin(idx, images)) == len(images) * np.sum(drawn == u)


def test_one_image_per_patient_is_image_resampling():
    probs, labels = _multiclass(5, 80)
    by_image = bootstrap.bootstrap_metrics("multiclass", probs, labels, NAMES3, resamples=100, seed=2)
    by_patient = bootstrap.bootstrap_metrics("multiclass", probs, labels, NAMES3, [f"p{i}" for i in range(80)],
                                             resamples=100, seed=2)
    assert by_patient["unit"] == "patient" and by_image["unit"] == "image"
    assert by_patient["metrics"] == by_image["metrics"]


def test_patient_intervals_are_wider_for_correlated_images():
    """20 identical images per patient: image resampling treats them as independent, patient resampling does not."""
    probs, labels = _multiclass(6, 30, skill=0.8)
    probs, labels = np.repeat(probs, 20, axis=0), np.repeat(labels, 20)
    patients = np.repeat([f"p{i}" for i in range(30)], 20)
    width = {}
    for unit, ids in (("image", None), ("patient", patients)):
        m = bootstrap.bootstrap_metrics("multiclass", probs, labels, NAMES3, ids, resamples=300, seed=0)["metrics"]
        width[unit] = m["accuracy"]["high"] - m["accuracy"]["low"]
    assert width["patient"] > 3 * width["image"]


def test_undefined_resamples_are_left_out_and_counted():
    probs = np.asarray([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.9, 0.1], [0.2, 0.8]])
    labels = np.asarray([0, 1, 0, 0, 0])  # one positive: many resamples have a single class
    out = bootstrap.bootstrap_metrics("multiclass", probs, labels, ["n", "p"], resamples=400, seed=1)
    auc = out["metrics"]["roc_auc"]
    ref = []
    for idx in _reference_draws(range(5), 400, 1):
        ref.append(sk_m.roc_auc_score(labels[idx], probs[idx, 1]) if len(set(labels[idx])) == 2 else np.nan)
    ref = np.asarray(ref)
    assert auc["undefined_resamples"] == int(np.isnan(ref).sum()) > 50
    assert (auc["low"], auc["high"]) == pytest.approx(tuple(np.quantile(ref[~np.isnan(ref)], [0.025, 0.975])))


def test_multilabel_mean_auc_against_scikit_learn():
    rng = np.random.default_rng(8)
    n, k = 100, 4
    labels = (rng.uniform(size=(n, k)) < 0.3).astype(int)
    probs = np.clip(labels * 0.3 + rng.uniform(size=(n, k)) * 0.7, 0, 1)
    out = bootstrap.bootstrap_metrics("multilabel", probs, labels, list("wxyz"), resamples=150, seed=5)
    ref = [np.mean([sk_m.roc_auc_score(labels[idx, c], probs[idx, c]) for c in range(k)
                    if 0 < labels[idx, c].sum() < len(idx)]) for idx in _reference_draws(range(n), 150, 5)]
    low, high = np.quantile(ref, [0.025, 0.975])
    assert out["metrics"]["mean_auc"]["low"] == pytest.approx(low, abs=1e-10)
    assert out["metrics"]["mean_auc"]["high"] == pytest.approx(high, abs=1e-10)


def test_bad_settings_are_refused():
    probs, labels = _multiclass(0, 10)
    with pytest.raises(bootstrap.BootstrapError, match="resamples"):
        bootstrap.bootstrap_metrics("multiclass", probs, labels, NAMES3, resamples=0)
    with pytest.raises(bootstrap.BootstrapError, match="confidence"):
        bootstrap.bootstrap_metrics("multiclass", probs, labels, NAMES3, confidence=95)


# ------------------------------------------------------------------------------------------------ predictions files


def _write(tmp_path, name, probs, labels, images, patients=None):
    path = str(tmp_path / f"{name}.npz")
    return bootstrap.write_predictions(path, task="multiclass", dataset="toy", class_names=NAMES3, probs=probs,
                                       labels=labels, images=images, patients=patients or [None] * len(labels))


def test_predictions_file_round_trip_and_errors(tmp_path):
    probs, labels = _multiclass(0, 12)
    path = _write(tmp_path, "p", probs, labels, [f"img/{i}.png" for i in range(12)], ["x"] * 6 + [None] * 6)
    assert sorted(os.listdir(tmp_path)) == ["p.npz"]  # written atomically: no temporary left
    back = bootstrap.read_predictions(path)
    assert np.array_equal(back["probs"], probs) and np.array_equal(back["labels"], labels)
    assert back["class_names"] == NAMES3 and back["task"] == "multiclass" and back["patients"][6] == ""
    with pytest.raises(bootstrap.BootstrapError, match="no such file"):
        bootstrap.read_predictions(str(tmp_path / "missing.npz"))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(bootstrap.BootstrapError, match="bad.npz: not a readable"):
        bootstrap.read_predictions(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "short.npz", probs=probs, labels=labels[:5], images=np.asarray(["a"] * 12),
             patients=np.asarray([""] * 12), class_names=np.asarray(NAMES3), task=np.asarray("multiclass"))
    with pytest.raises(bootstrap.BootstrapError, match="field 'labels' has 5 rows"):
        bootstrap.read_predictions(str(tmp_path / "short.npz"))


# ------------------------------------------------------------------------------------------------ paired comparison


def _pair(tmp_path, n=200, patients=None):
    probs_a, labels = _multiclass(9, n, skill=2.5)
    rng = np.random.default_rng(10)
    logits = rng.normal(size=(n, 3)) + 0.7 * np.eye(3)[labels]
    probs_b = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    images = [f"test/{i:04d}.png" for i in range(n)]
    a = bootstrap.read_predictions(_write(tmp_path, "a", probs_a, labels, images, patients))
    perm = rng.permutation(n)  # B's file lists the images in another order
    b = bootstrap.read_predictions(_write(tmp_path, "b", probs_b[perm], labels[perm], [images[i] for i in perm],
                                          [patients[i] for i in perm] if patients else None))
    return a, b, (probs_a, probs_b, labels)


def test_compare_equals_direct_numpy_paired_bootstrap(tmp_path):
    a, b, (probs_a, probs_b, labels) = _pair(tmp_path)
    out = bootstrap.compare(a, b, resamples=300, seed=4)
    diffs = np.asarray([_accuracy(probs_a, labels, idx) - _accuracy(probs_b, labels, idx)
                        for idx in _reference_draws(range(200), 300, 4)])
    acc = out["metrics"]["accuracy"]
    assert acc["difference"] == _accuracy(probs_a, labels, np.arange(200)) - _accuracy(probs_b, labels,
                                                                                       np.arange(200))
    assert (acc["low"], acc["high"]) == tuple(np.quantile(diffs, [0.025, 0.975]))  # bitwise
    tail = min(np.sum(diffs <= 0), np.sum(diffs >= 0))
    assert acc["p_value"] == min(1.0, 2 * (1 + tail) / 301)
    assert acc["low"] > 0 and acc["p_value"] < 0.01  # A is clearly better
    assert out["difference"] == "A - B" and out["unit"] == "image"
    # swapping the runs flips the differences
    back = bootstrap.compare(b, a, resamples=300, seed=4)["metrics"]["accuracy"]
    assert back["difference"] == pytest.approx(-acc["difference"]) and back["high"] == pytest.approx(-acc["low"])


def test_compare_a_run_with_itself_and_patients(tmp_path):
    patients = [f"p{i // 4}" for i in range(200)]
    a, b, _ = _pair(tmp_path, patients=patients)
    same = bootstrap.compare(a, a, resamples=100, seed=0)
    assert same["unit"] == "patient" and same["num_units"] == 50
    for row in same["metrics"].values():
        if row["difference"] is not None:
            assert row["difference"] == 0 and row["low"] == row["high"] == 0 and row["p_value"] == 1.0
    out = bootstrap.compare(a, b, resamples=100, seed=0)
    assert out["unit"] == "patient" and "patients resampled" in out["note"]


def test_compare_refuses_different_test_sets(tmp_path):
    probs, labels = _multiclass(0, 20)
    a = bootstrap.read_predictions(_write(tmp_path, "a", probs, labels, [f"x{i}" for i in range(20)]))
    b = bootstrap.read_predictions(_write(tmp_path, "b", probs, labels, [f"y{i}" for i in range(20)]))
    with pytest.raises(bootstrap.BootstrapError, match="not tested on the same images: 20 only in A"):
        bootstrap.compare(a, b)
    c = bootstrap.read_predictions(_write(tmp_path, "c", probs, (labels + 1) % 3, [f"x{i}" for i in range(20)]))
    with pytest.raises(bootstrap.BootstrapError, match="different labels"):
        bootstrap.compare(a, c)


# ------------------------------------------------------------------------------------------------ through the trainer

FAST = ["--config.fake_data=120", "--config.epochs=1", "--config.batch_size=8", "--config.progress_bar=False",
        "--config.dataset=ham10000", "--config.bootstrap.resamples=120"]


def _train(workdir, data_root, *overrides, check=True):
    import subprocess
    import sys

    from medjax.testing import ROOT

    cmd = [sys.executable, "-m", "medjax.main", "--config=configs/demo.py", f"--workdir={workdir}",
           f"--config.data_root={data_root}", *FAST, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two short runs on the same synthetic HAM10000 split (lesion ids: patient resampling), selected by
    validation accuracy without augmentation (the glioma protocol's switches)."""
    root = tmp_path_factory.mktemp("runs")
    data_root = str(root / "ham")
    a = _train(root / "a", data_root, "--config.selection_metric=accuracy", "--config.train_augment=False")
    b = _train(root / "b", data_root, "--config.optim.lr=1e-2")
    return root, a, b


def test_trainer_writes_predictions_and_intervals(two_runs):
    import json

    from medjax import data

    root, proc, _ = two_runs
    m = json.load(open(root / "a" / "metrics.json"))
    assert m["selection_metric"] == "accuracy" and "val accuracy" in proc.stdout
    assert all("accuracy" in h for h in m["history"])
    pred = bootstrap.read_predictions(str(root / "a" / bootstrap.PREDICTIONS_FILE))
    ds = data.get_dataset("ham10000", str(root / "ham"), seed=0)
    test = ds.splits["test"]
    assert list(pred["images"]) == [ds.relative(r.path) for r in test]
    assert list(pred["patients"]) == [r.patient for r in test] and list(pred["labels"]) == [r.label for r in test]
    assert metrics.compute_metrics("multiclass", pred["probs"], pred["labels"], pred["class_names"]) == {
        k: v for k, v in m["test"].items() if k != "num_examples"}
    b = m["test_bootstrap"]
    assert b["unit"] == "patient" and b["num_units"] == len({r.patient for r in test}) and b["resamples"] == 120
    again = bootstrap.bootstrap_metrics("multiclass", pred["probs"], pred["labels"], pred["class_names"],
                                        list(pred["patients"]), resamples=120, seed=0)
    assert json.loads(json.dumps(again["metrics"])) == b["metrics"]  # recomputable from the stored predictions
    assert set(b["metrics"]) == set(bootstrap.scalar_metric_names(m["test"]))


def test_report_shows_the_intervals_and_compares_two_runs(two_runs, tmp_path):
    import json

    from medjax.testing import run_cli

    root, _, _ = two_runs
    proc = run_cli("medjax.report", str(root / "a"), str(root / "b"), "--output", str(tmp_path / "report"))
    m = json.load(open(root / "a" / "metrics.json"))
    acc = m["test_bootstrap"]["metrics"]["balanced_accuracy"]
    shown = f"{acc['value']:.3f} (95% CI {acc['low']:.3f}–{acc['high']:.3f})"
    md = open(tmp_path / "report" / "results.md").read()
    assert shown in md and "## Every test metric with its 95% percentile bootstrap interval" in md
    assert f"{acc['value']:.4f} ({acc['low']:.4f}–{acc['high']:.4f})" in proc.stdout
    rows = [r for r in open(tmp_path / "report" / "intervals.csv").read().splitlines()[1:]]
    assert len(rows) == 2 * len(m["test_bootstrap"]["metrics"])
    out = tmp_path / "cmp.json"
    proc = run_cli("medjax.report", "compare", str(root / "a"), str(root / "b" / bootstrap.PREDICTIONS_FILE),
                   "--resamples", "150", "--output", str(out))
    result = json.load(open(out))
    assert result["unit"] == "patient" and result["resamples"] == 150 and result["difference"] == "A - B"
    direct = bootstrap.compare(bootstrap.read_predictions(str(root / "a" / bootstrap.PREDICTIONS_FILE)),
                               bootstrap.read_predictions(str(root / "b" / bootstrap.PREDICTIONS_FILE)),
                               resamples=150, seed=0)
    assert result["metrics"] == json.loads(json.dumps(direct["metrics"]))
    line = next(x for x in proc.stdout.splitlines() if x.startswith("accuracy "))
    assert f"{result['metrics']['accuracy']['p_value']:.4f}" in line
    bad = run_cli("medjax.report", "compare", str(root / "a"), str(tmp_path), check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "test_predictions.npz" in bad.stderr


def test_a_selection_metric_of_another_task_stops_at_start(two_runs):
    root, _, _ = two_runs
    proc = _train(root / "c", str(root / "ham"), "--config.selection_metric=mean_auc", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: selection_metric: target metric 'mean_auc' "
                                                             "does not apply to a multiclass task")
