"""medjax.predict on the demo run: the test metrics of metrics.json recomputed from preds.csv (1 and 8 devices), the
operating points against a brute-force Youden search, test-time augmentation against flipped inputs, the other
inputs (images, folders, CSV) and bad files; the explain command on the same run."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from medjax import metrics, predict, thresholds, trained
from medjax.testing import ROOT

FAST = ["--config.fake_data=96", "--config.epochs=2", "--config.batch_size=8", "--config.progress_bar=False"]


def _cli(module, *args, devices=None):
    env = dict(os.environ)
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env=env)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    workdir, data_root = root / "run", root / "data"
    proc = _cli("medjax.main", "--config=configs/demo.py", f"--workdir={workdir}", f"--config.data_root={data_root}",
                *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, data_root


def _read(path, class_names):
    rows = list(csv.DictReader(open(path)))
    probs = np.array([[float(r[f"prob/{n}"]) for n in class_names] for r in rows])
    get = lambda prefix: np.array([[int(r[f"{prefix}/{n}"]) for n in class_names] for r in rows])  # noqa: E731
    labels = get("label") if f"label/{class_names[0]}" in rows[0] else None
    return rows, probs, get("pred"), labels


def _predict(run, *extra, split="test", devices=None, out=None):
    workdir, data_root = run
    out = out or workdir.parent / f"preds_{split}_{devices or 1}_{len(list(workdir.parent.glob('preds_*')))}.csv"
    proc = _cli("medjax.predict", "--workdir", workdir, "--dataset", "chexpert", "--root", data_root, "--split",
                split, "--output", out, "--no-progress", *extra, devices=devices)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_predict_reproduces_the_test_metrics_of_the_run(run):
    workdir, _ = run
    result = json.load(open(workdir / "metrics.json"))
    test, names = result["test"], result["test"]["class_names"]
    out, proc = _predict(run, "--metrics", workdir.parent / "predict_metrics.json")
    rows, probs, pred, labels = _read(out, names)
    assert len(rows) == test["num_examples"] == 10
    recomputed = metrics.compute_metrics("multilabel", probs, labels, names) | {"num_examples": len(rows)}
    assert recomputed == {k: v for k, v in test.items() if k != "at_thresholds"}  # exactly, every metric
    assert f"mean_auc: {test['mean_auc']}" in proc.stdout
    # the operating points: stored with the best model, in metrics.json, and used for the pred/<class> columns
    points = thresholds.load(workdir / "best" / f"step_{result['best_step']}")
    assert points == {k: v for k, v in result["thresholds"].items()}
    cut = thresholds.as_array(points, names)
    assert np.array_equal(pred, (probs >= cut).astype(int))
    assert thresholds.thresholded_metrics(probs, labels, names, cut) == test["at_thresholds"]
    assert json.load(open(workdir.parent / "predict_metrics.json"))["at_thresholds"] == test["at_thresholds"]
    assert test["threshold"] == 0.5 and "f1_macro" in test  # the metrics at 0.5 stay beside them


def test_predict_on_eight_devices_gives_the_same_probabilities_and_metrics(run):
    workdir, _ = run
    test = json.load(open(workdir / "metrics.json"))["test"]
    names = test["class_names"]
    one, _ = _predict(run)
    eight, _ = _predict(run, devices=8)
    _, p1, _, _ = _read(one, names)
    rows, p8, _, labels = _read(eight, names)
    assert np.abs(p8 - p1).max() <= 1e-6
    assert metrics.compute_metrics("multilabel", p8, labels, names) | {"num_examples": len(rows)} == \
        {k: v for k, v in test.items() if k != "at_thresholds"}


def _brute_force_youden(y, s):
    """Every distinct score as the threshold; the highest one among equal J."""
    best_j, best_t = -np.inf, None
    for t in np.unique(s):  # increasing, so >= keeps the highest threshold among ties
        j = np.sum(s[y == 1] >= t) / np.sum(y == 1) - np.sum(s[y == 0] >= t) / np.sum(y == 0)
        if j >= best_j:
            best_j, best_t = j, t
    return best_t, best_j


def test_operating_points_are_the_youden_points_of_the_validation_scores(run):
    workdir, _ = run
    result = json.load(open(workdir / "metrics.json"))
    names = result["val"]["class_names"]
    out, _ = _predict(run, split="val")
    _, probs, _, labels = _read(out, names)
    stored = result["thresholds"]
    checked = 0
    for c, name in enumerate(names):
        y = labels[:, c]
        if y.min() == y.max():
            assert stored["thresholds"][name] == 0.5 and name in stored["undefined"]
            continue
        t, _ = _brute_force_youden(y, probs[:, c])
        assert stored["thresholds"][name] == t, name
        checked += 1
    assert checked >= 5
    assert stored["val"] == thresholds.thresholded_metrics(probs, labels, names, thresholds.as_array(stored, names))


def test_youden_and_sensitivity_points_against_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(2, 40))
        s = np.round(rng.random(n), int(rng.integers(1, 3)))  # coarse scores: many ties
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            continue
        t, j = thresholds.youden_point(y, s)
        bt, bj = _brute_force_youden(y, s)
        assert (t, j) == (bt, pytest.approx(bj, abs=1e-12)), trial
        target = float(rng.choice([0.5, 0.8, 0.9, 1.0]))
        ok = [u for u in np.unique(s) if np.mean(s[y == 1] >= u) >= target - 1e-12]
        assert thresholds.sensitivity_point(y, s, target) == max(ok), trial
    choice = thresholds.choose(np.array([[0.2, 0.9], [0.8, 0.1]]), np.array([[0, 1], [1, 1]]), ["a", "b"],
                               "sensitivity:0.5")
    assert choice["thresholds"] == {"a": 0.8, "b": 0.5} and list(choice["undefined"]) == ["b"]
    for bad in ("youdens", "sensitivity:0", "sensitivity:1.5", "sensitivity:x"):
        with pytest.raises(thresholds.ThresholdError, match="thresholds="):
            thresholds.parse_rule(bad)


def test_tta_flips_average_the_flipped_views(run):
    import jax.numpy as jnp

    from medjax import data

    workdir, data_root = run
    model = trained.load_model(str(workdir))
    out, _ = _predict(run, "--tta", "flips")
    _, got, _, _ = _read(out, model.class_names)
    records, _ = predict.dataset_records(model, "chexpert", str(data_root), "test")
    dataset = data.Dataset("t", model.task, model.class_names, model.channels, "", model.mean, model.std,
                           {"t": records})
    images = np.concatenate([b["image"][b["mask"]] for b in data.make_loader(
        dataset, "t", batch_size=8, image_size=model.image_size, train=False, normalization=model.normalization(),
        shard_index=0, shard_count=1)])
    classifier, variables = model.plain()
    views = [images, images[:, ::-1], images[:, :, ::-1], images[:, ::-1, ::-1]]
    expected = np.mean([1 / (1 + np.exp(-np.asarray(classifier.apply(variables, jnp.asarray(v.copy())), np.float64)))
                        for v in views], axis=0)
    assert np.abs(got - expected).max() <= 1e-6
    _, plain, _, _ = _read(_predict(run)[0], model.class_names)
    assert np.abs(got - plain).max() > 1e-4  # the flips do change the probabilities


def test_images_csv_and_bad_files(run, tmp_path):
    workdir, data_root = run
    images = sorted(str(p) for p in (data_root / "valid").rglob("*.jpg"))[:3]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    missing = tmp_path / "missing.jpg"
    out = tmp_path / "preds.csv"
    proc = _cli("medjax.predict", "--workdir", workdir, "--images", *images, broken, missing, "--output", out,
                "--no-progress")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(out)))
    assert [r["path"] for r in rows] == images
    assert "label/No Finding" not in rows[0] and "pred/No Finding" in rows[0]
    assert f"warning: {broken}:" in proc.stderr and f"warning: {missing}: file not found" in proc.stderr
    assert "2 unreadable image(s) left out" in proc.stdout
    strict = _cli("medjax.predict", "--workdir", workdir, "--images", *images, broken, "--output", tmp_path / "s.csv",
                  "--strict", "--no-progress")
    assert strict.returncode == 2 and strict.stderr.count("error:") == 1 and str(broken) in strict.stderr
    assert not (tmp_path / "s.csv").exists()
    # a folder, searched recursively, gives the same rows as its files
    folder = _cli("medjax.predict", "--workdir", workdir, "--images", data_root / "valid", "--output",
                  tmp_path / "f.csv", "--no-progress")
    assert folder.returncode == 0, folder.stderr
    by_path = {r["path"]: r for r in csv.DictReader(open(tmp_path / "f.csv"))}
    assert all(by_path[r["path"]] == r for r in rows)
    # a CSV with labels: the run's own preds.csv, read back (path relative to the CSV, label/<class> columns)
    test_csv, _ = _predict(run)
    with open(test_csv) as f:
        lines = list(csv.reader(f))
    relative = tmp_path / "relative.csv"
    with open(relative, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(lines[0])
        for line in lines[1:]:
            w.writerow([os.path.relpath(data_root / line[0], tmp_path)] + line[1:])
    again = _cli("medjax.predict", "--workdir", workdir, "--csv", relative, "--output", tmp_path / "again.csv",
                 "--no-progress")
    assert again.returncode == 0, again.stderr
    test = json.load(open(workdir / "metrics.json"))["test"]
    assert f"mean_auc: {test['mean_auc']}" in again.stdout
    # bad input: one error line naming the file and the line
    bad = tmp_path / "bad.csv"
    bad.write_text(f"path,label\n{images[0]},Not A Class\n")
    proc = _cli("medjax.predict", "--workdir", workdir, "--csv", bad, "--output", tmp_path / "x.csv")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert f"{bad} line 2" in proc.stderr and "'Not A Class' is not a class" in proc.stderr
    for args in (["--workdir", tmp_path, "--images", images[0], "--output", out],
                 ["--workdir", workdir, "--dataset", "chexpert", "--output", out]):
        proc = _cli("medjax.predict", *args)
        assert proc.returncode == 2 and proc.stderr.startswith("error:") and proc.stderr.count("\n") == 1, proc.stderr


def test_a_bad_threshold_rule_stops_the_run_at_start(tmp_path):
    proc = _cli("medjax.main", "--config=configs/demo.py", f"--workdir={tmp_path / 'run'}",
                f"--config.data_root={tmp_path / 'data'}", *FAST, "--config.thresholds=youdens")
    assert proc.returncode == 2 and "error: config field thresholds='youdens'" in proc.stderr


def test_explain_writes_one_png_per_image(run, tmp_path):
    from PIL import Image

    workdir, data_root = run
    images = sorted(str(p) for p in (data_root / "valid").rglob("*.jpg"))[:2]
    for method in ("attention", "occlusion"):
        out = tmp_path / method
        proc = _cli("medjax.explain", "--workdir", workdir, "--images", *images, "--output", out, "--method", method)
        assert proc.returncode == 0, proc.stderr[-3000:]
        pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
        assert len(pngs) == 2 and all(Image.open(out / p).size[0] > 400 for p in pngs)
    proc = _cli("medjax.explain", "--workdir", workdir, "--images", *images, "--output", tmp_path / "g",
                "--method", "gradcam")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --method gradcam: the dinov2 family")
