"""The results report: synthetic metrics.json files (as the trainer writes them, with the grid's cell files) -> the
SPEC section 2 table with the study's numbers beside ours, CSVs, and one PNG per dataset."""

import csv
import json
import os

import pytest

from medjax import grid as grid_cli
from medjax import report
from medjax.testing import ROOT, run_cli

grid = grid_cli.load_grid(os.path.join(ROOT, "configs", "grid.py"))
HEADER = "| model (params M) | DDSM ROC-AUC | CheXpert mean AUC | ISIC macro recall | APTOS quadratic kappa |"


def _split(dataset, value):
    if dataset == "chexpert":
        return {"task": "multilabel", "mean_auc": value, "map": 0.3, "num_examples": 10}
    key = {"ddsm": "roc_auc", "cbis_ddsm": "roc_auc", "isic2019": "balanced_accuracy",
           "aptos2019": "quadratic_kappa"}[dataset]
    return {"task": "multiclass", key: value, "accuracy": 0.5, "num_examples": 10}


def _run(root, arg, dataset, val, test, cell=True, folder=None):
    """A work directory as `python -m medjax.grid run` leaves it: grid_cell.json + the trainer's metrics.json."""
    workdir = os.path.join(root, folder) if folder else grid_cli.cell_workdir(root, grid.parse_arg(arg))
    os.makedirs(workdir, exist_ok=True)
    if cell:
        grid_cli.write_cell_file(workdir, grid.get_config(arg))
    target = {"chexpert": "mean_auc", "ddsm": "roc_auc", "cbis_ddsm": "roc_auc", "isic2019": "balanced_accuracy",
              "aptos2019": "quadratic_kappa"}[dataset]
    metrics = {"dataset": dataset, "task": _split(dataset, 0)["task"], "target_metric": target, "best_step": 10,
               "val": _split(dataset, val), "history": [{"step": 10, target: val}]}
    if test is not None:
        metrics["test"] = _split(dataset, test)
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump(metrics, f)
    return workdir


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    runs = str(tmp_path_factory.mktemp("runs"))
    other = str(tmp_path_factory.mktemp("other"))
    _run(runs, "model=dinov2_b,dataset=chexpert,head=linear,freeze=frozen", "chexpert", 0.80, 0.79)
    _run(runs, "model=dinov2_b,dataset=chexpert,head=attention,freeze=full", "chexpert", 0.82, 0.78)
    _run(runs, "model=dinov2_b,dataset=ddsm,head=linear,freeze=frozen", "ddsm", 0.90, 0.95)
    _run(runs, "model=dinov2_s,dataset=isic2019,head=linear,freeze=frozen", "isic2019", 0.60, 0.70)
    _run(runs, "model=aimv2_h,dataset=aptos2019,head=linear,freeze=full", "aptos2019", 0.90, 0.91)
    _run(runs, "model=mae_b,dataset=ddsm,head=linear,freeze=frozen", "ddsm", 0.70, None)  # no test result
    _run(runs, "model=sam2_b+,dataset=ddsm,head=linear,freeze=frozen", "cbis_ddsm", 0.81, 0.88, cell=False,
         folder="my_cbis_run")  # started by hand: no grid_cell.json
    # the same cell again elsewhere, with a worse validation value: left out
    _run(other, "model=dinov2_b,dataset=chexpert,head=linear,freeze=frozen", "chexpert", 0.50, 0.99)
    out = str(tmp_path_factory.mktemp("report"))
    proc = run_cli("medjax.report", runs, other, "--output", out)
    return out, proc


def test_markdown_table_is_laid_out_like_the_study(outputs):
    out, proc = outputs
    assert "7 runs ->" in proc.stdout and "same cell" in proc.stderr
    md = open(os.path.join(out, "results.md")).read()
    # the best table, then one per setting found (3 settings of the grid, 1 for the run without a cell file)
    assert md.count(HEADER + " cbis_ddsm roc_auc |") == 5 and "warning" not in proc.stderr.lower()
    best = md.split("## Setting:")[0]
    rows = [line for line in best.splitlines() if line.startswith("| ") and not line.startswith(HEADER)]
    names = [r.split(" (")[0][2:] for r in rows]
    assert names[:len(report.STUDY)] == list(report.STUDY)  # the study's rows, in its order, run or not
    assert names[len(report.STUDY):] == ["DINOv2-S", "my_cbis_run"]
    # the best setting per cell is chosen by validation: attention/full (val 0.82, test 0.78), not the best test
    assert ("| DINOv2-B (86.6 / 86) | 0.950 [linear / frozen] (0.966) | 0.780 [attention / full] (0.812) "
            "| — (0.859) | — (0.909) | — |") in rows
    assert ("| AIMv2-H (680.9 / 666) | — (0.966) | — (0.819) | — (0.863) | 0.910 [linear / full] (0.909) "
            "| — |") in rows
    assert "| VMamba-S (— / 50) | — (0.938) | — (0.777) | — (0.756) | — (0.872) | — |" in rows
    assert "| DINOv2-S (22.1 / —) | — | — | 0.700 [linear / frozen] | — | — |" in rows
    assert "| my_cbis_run (— / —) | — | — | — | — | 0.880 [no grid cell] |" in rows
    assert "| MAE-B (85.8 / 86) | — [linear / frozen] (0.943) |" in md  # run, but no test result
    assert "## Setting: attention / full (head / backbone)" in md
    assert "no grid_cell.json" in md and "no test split result" in md


def test_csv_tables(outputs):
    out, _ = outputs
    rows = list(csv.DictReader(open(os.path.join(out, "results.csv"))))
    best = {r["model"]: r for r in rows if r["setting"] == report.BEST}
    assert set(report.STUDY) <= set(best)
    d = best["DINOv2-B"]
    assert (d["params_m"], d["study_params_m"]) == ("86.58", "86")
    assert (d["CheXpert mean AUC"], d["CheXpert mean AUC (study)"], d["CheXpert mean AUC setting"]) == (
        "0.78", "0.812", "attention / full")
    assert d["DDSM ROC-AUC"] == "0.95" and d["ISIC macro recall"] == "" and d["ISIC macro recall (study)"] == "0.859"
    linear = [r for r in rows if r["setting"] == "linear / frozen" and r["model"] == "DINOv2-B"]
    assert linear[0]["CheXpert mean AUC"] == "0.79"
    runs = list(csv.DictReader(open(os.path.join(out, "runs.csv"))))
    assert len(runs) == 7 and {r["dataset"] for r in runs} == {"chexpert", "ddsm", "isic2019", "aptos2019",
                                                               "cbis_ddsm"}


def test_a_png_per_dataset(outputs):
    mpimg = pytest.importorskip("matplotlib.image", reason="the figures need matplotlib (pip install matplotlib)")
    out, _ = outputs
    for dataset in ("ddsm", "chexpert", "isic2019", "aptos2019", "cbis_ddsm"):
        path = os.path.join(out, f"{dataset}.png")
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n", dataset
        image = mpimg.imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 300 and image.std() > 0.05, dataset


def test_study_numbers_are_spec_section_2():
    assert len(report.STUDY) == 13
    assert report.STUDY["AIMv2-H"] == (666, {"ddsm": 0.966, "chexpert": 0.819, "isic2019": 0.863, "aptos2019": 0.909})
    assert report.STUDY["VMamba-S"][1]["isic2019"] == 0.756 and report.STUDY["SAM2-L"][0] == 225
    assert [c[0] for c in report.COLUMNS] == ["ddsm", "chexpert", "isic2019", "aptos2019"]


def test_errors_name_the_path(tmp_path):
    proc = run_cli("medjax.report", str(tmp_path / "missing"), "--output", str(tmp_path / "o"), check=False)
    assert proc.returncode != 0 and "missing" in proc.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text("{}")
    proc = run_cli("medjax.report", str(tmp_path / "bad"), "--output", str(tmp_path / "o"), check=False)
    assert proc.returncode != 0 and "not a medjax metrics.json" in proc.stderr


# ------------------------------------------------------------------------------------------------ intervals, baselines


def _with_intervals(workdir, key, value, low, high, unit="patient"):
    """Adds a `test_bootstrap` record (as medjax.bootstrap writes it) to a run's metrics.json."""
    path = os.path.join(workdir, "metrics.json")
    m = json.load(open(path))
    m["test"][key] = value
    entries = {key: {"value": value, "low": low, "high": high, "mean": value, "std": 0.01, "undefined_resamples": 0}}
    if key != "accuracy":
        entries["accuracy"] = {"value": 0.5, "low": 0.4, "high": 0.6, "mean": 0.5, "std": 0.05,
                               "undefined_resamples": 0}
    m["test_bootstrap"] = {"method": "percentile bootstrap", "confidence": 0.95, "resamples": 1000, "seed": 0,
                           "unit": unit, "num_units": 40, "num_images": 90, "note": "", "metrics": entries}
    json.dump(m, open(path, "w"))


def _companion(root, arg, dataset, target, val, test_value, low, high):
    workdir = grid_cli.cell_workdir(root, grid.parse_arg(arg))
    os.makedirs(workdir)
    grid_cli.write_cell_file(workdir, grid.get_config(arg))
    metrics = {"dataset": dataset, "task": "multiclass", "target_metric": target, "best_step": 10,
               "val": {"task": "multiclass", target: val, "accuracy": val},
               "test": {"task": "multiclass", target: 0.5, "accuracy": 0.5, "num_examples": 90}}
    json.dump(metrics, open(os.path.join(workdir, "metrics.json"), "w"))
    _with_intervals(workdir, "accuracy", test_value, low, high)
    return workdir


def test_baselines_beside_the_foundation_models_with_intervals(tmp_path):
    root = str(tmp_path / "runs")
    _companion(root, "model=dinov2_b_lc,dataset=chest_xray_pneumonia,freeze=frozen", "chest_xray_pneumonia",
               "roc_auc", 0.9, 0.912, 0.884, 0.937)
    _companion(root, "model=dinov2_b_lc,dataset=chest_xray_pneumonia,freeze=full", "chest_xray_pneumonia",
               "roc_auc", 0.9, 0.871, 0.840, 0.899)
    _companion(root, "model=resnet50,dataset=chest_xray_pneumonia,freeze=full", "chest_xray_pneumonia", "roc_auc",
               0.9, 0.853, 0.821, 0.884)
    _companion(root, "model=dinov2_s_lc,dataset=ham10000,freeze=frozen", "ham10000", "balanced_accuracy", 0.7,
               0.701, 0.672, 0.729)
    probe = _companion(root, "model=biomedclip,dataset=brain_tumor_figshare", "brain_tumor_figshare",
                       "balanced_accuracy", 0.8, 0.5, 0.4, 0.6)
    _with_intervals(probe, "balanced_accuracy", 0.811, 0.774, 0.846)
    _companion(root, "model=dinov2_l,dataset=brain_tumor_figshare,head=probe", "brain_tumor_figshare",
               "balanced_accuracy", 0.8, 0.5, 0.4, 0.6)
    main = _run(root, "model=dinov2_b,dataset=ddsm,head=linear,freeze=frozen", "ddsm", 0.90, 0.95)
    _with_intervals(main, "roc_auc", 0.95, 0.931, 0.967, unit="image")
    out = str(tmp_path / "report")
    proc = run_cli("medjax.report", root, "--output", out)
    md = open(os.path.join(out, "results.md")).read()
    # the reference study's table: ours with its interval, the study's number after it
    assert "| DINOv2-B (86.6 / 86) | 0.950 (95% CI 0.931–0.967) [linear / frozen] (0.966) |" in md
    glioma = md.split("## Fu et al.")[1].split("\n## ")[0]
    rows = [line for line in glioma.splitlines() if line.startswith("| ") and "model (params M)" not in line]
    assert glioma.splitlines()[4].startswith("| model (params M) | chest_xray_pneumonia accuracy (frozen) | "
                                             "chest_xray_pneumonia accuracy (full) | ichallenge_amd accuracy")
    assert [r.split(" (")[0][2:] for r in rows] == ["DINOv2-S lc", "DINOv2-B lc", "ResNet-50 †"]  # foundation first
    assert rows[1].startswith("| DINOv2-B lc (88.1) | 0.912 (95% CI 0.884–0.937) | 0.871 (95% CI 0.840–0.899) | — |")
    assert rows[2].startswith("| ResNet-50 † (25.6) | — | 0.853 (95% CI 0.821–0.884) | — |")
    assert "| 0.701 (95% CI 0.672–0.729) |" in rows[0]
    radiology = md.split("## Baharoon et al.")[1].split("\n## ")[0]
    assert "| model (params M) | nih_chestxray14 | chexpert | brain_tumor_figshare balanced_accuracy |" in radiology
    assert radiology.index("| DINOv2-L (304.4) |") < radiology.index("| BiomedCLIP † (86.2) | — | — | 0.811 (95% CI "
                                                                       "0.774–0.846) |")
    every = md.split("## Every test metric")[1]
    assert "| ResNet-50 † | linear / full | 40 patients x 1000 | 0.853 (0.821–0.884) |" in every
    assert ("| DINOv2-B | linear / frozen | 40 images x 1000 | 0.950 (0.931–0.967) | 0.500 (0.400–0.600) |"
            in every)
    assert "ham10000 DINOv2-S lc [mlp / frozen]: test balanced_accuracy" not in proc.stdout  # no target interval
    assert ("ddsm DINOv2-B [linear / frozen]: test roc_auc 0.9500 (0.9310–0.9670) (95% CI, 40 images"
            in proc.stdout)
    results = {r["model"]: r for r in csv.DictReader(open(os.path.join(out, "results.csv")))
               if r["setting"] == report.BEST}
    assert (results["DINOv2-B"]["DDSM ROC-AUC low"], results["DINOv2-B"]["DDSM ROC-AUC high"]) == ("0.931", "0.967")
    assert "ResNet-50" not in results  # the reference study's table holds its own runs
    runs = {(r["model"], r["dataset"], r["freeze"]): r for r in csv.DictReader(open(os.path.join(out, "runs.csv")))}
    r = runs[("BiomedCLIP", "brain_tumor_figshare", "frozen")]
    assert (r["grid_study"], r["kind"], r["head"], r["test_low"], r["resampled"]) == (
        "radiology", "baseline", "probe", "0.774", "patient")
    intervals = list(csv.DictReader(open(os.path.join(out, "intervals.csv"))))
    assert len(intervals) == 4 + 2 + 1 + 2  # glioma runs: accuracy; BiomedCLIP, DDSM: two metrics; DINOv2-L: one
    assert {r["metric"] for r in intervals} == {"accuracy", "balanced_accuracy", "roc_auc"}


def test_compare_errors_name_the_file(tmp_path):
    proc = run_cli("medjax.report", "compare", str(tmp_path), str(tmp_path), check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert f"{tmp_path}/test_predictions.npz: no such file" in proc.stderr
