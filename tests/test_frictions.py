"""The first-day frictions (issue 22 C) and output-path misuse (issue 23 item 15), on one demo run: explain's PNGs
named and titled by the image's path relative to the folder given, with a colour bar; phases announced and cheap
arguments refused before a model loads; one warning per bad file; the StableHLO export's preprocessing recorded (and
checked by redoing it from the README with Pillow against the run's own test predictions); the report's figure with
the user's run and no overlapping labels; "did you mean" in the converter; outputs with the user's umask; no TFDS
"Downloading" line in prepare; one `error:` line, exit 2, for every output path given wrongly."""

import csv
import json
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image
from safetensors.numpy import load_file

from medjax import explain, export, predict, pretrained, report, trained
from medjax.testing import ROOT

FAST = ["--config.fake_data=96", "--config.epochs=2", "--config.batch_size=8", "--config.progress_bar=False"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("frictions")
    workdir, data_root = root / "run", root / "data"
    proc = subprocess.run([sys.executable, "-m", "medjax.main", "--config=configs/demo.py", f"--workdir={workdir}",
                           f"--config.data_root={data_root}", *FAST], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, data_root


@pytest.fixture(scope="module", autouse=True)
def one_load(run):
    """The commands below load the run's model once between them (a model load is most of their time)."""
    loaded, load = {}, trained.load_model

    def cached(source, mesh=None):
        key = os.path.abspath(source)
        if key not in loaded:
            loaded[key] = load(source, mesh)
        return loaded[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trained, "load_model", cached)
        yield


def _new_file_mode() -> int:
    """What open(path, "w") gives a new file under this process's umask (read independently of medjax)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the arguments were checked")


def _one_error(capsys, code, *expected):
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2, err
    assert len([x for x in lines if x.startswith("error:")]) == 1 and "Traceback" not in err, err
    error = next(x for x in lines if x.startswith("error:"))
    for text in expected:
        assert text in error, error
    return error


# ------------------------------------------------------------------------------------------------ explain


def _jet_runs(png: str, min_length: int = 120) -> list[int]:
    """Columns of the PNG holding a colour scale: >= min_length consecutive pixels that are colours of matplotlib's
    jet map, their jet values falling from ~1 at the top to ~0 at the bottom."""
    img = np.asarray(Image.open(png).convert("RGB"), np.float64) / 255
    jet = colormaps["jet"](np.linspace(0, 1, 256))[:, :3]
    found = []
    for x in range(img.shape[1]):
        column = img[:, x]
        dist = np.linalg.norm(column[:, None, :] - jet[None], axis=-1)
        value, ok = dist.argmin(axis=1) / 255, dist.min(axis=1) < 0.02
        start = None
        for y in range(len(column) + 1):
            if y < len(column) and ok[y]:
                start = y if start is None else start
                continue
            if start is not None and y - start >= min_length:
                v = value[start:y]
                if v[0] > 0.95 and v[-1] < 0.05 and np.all(np.diff(v) <= 1e-9):
                    found.append(x)
            start = None
    return found


def test_explain_names_pngs_by_the_relative_path_with_a_title_and_a_colour_bar(run, tmp_path, monkeypatch):
    workdir, data_root = run
    valid = data_root / "valid"
    frontal = sorted(valid.rglob("view1_frontal.jpg"))
    assert len(frontal) >= 2  # every patient has a view1_frontal.jpg: base names alone collide
    folder = tmp_path / "some"  # a folder holding patient/study/view files, and a file of the same base name
    shutil.copytree(frontal[0].parent, folder / frontal[0].parent.parent.name / frontal[0].parent.name)
    titles = []
    original = explain.render
    monkeypatch.setattr(explain, "render", lambda *a, **k: titles.append(a[3]) or original(*a, **k))
    out = tmp_path / "maps"
    assert explain.main(["--workdir", str(workdir), "--images", str(folder), str(frontal[1]), "--output",
                         str(out)]) == 0
    inside = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.jpg"))
    expected = [p[:-4] + ".png" for p in inside] + ["view1_frontal.png"]
    got = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert got == sorted(expected)
    rows = {r["png"]: r["image"] for r in csv.DictReader(open(out / explain.INDEX_FILE))}
    assert rows["view1_frontal.png"] == str(frontal[1])
    assert all(rows[p[:-4] + ".png"] == str(folder / p) for p in inside)
    assert sorted(t.split(": ")[0] for t in titles) == sorted(inside + ["view1_frontal.jpg"])
    for png in got:
        assert _jet_runs(str(out / png)), f"{png}: no colour bar"
    # two roots giving the same relative path: relative to their common folder instead, still unique
    assert explain.png_names(explain.relative_paths(["/d/a/x.jpg", "/d/b/x.jpg", "/d/b/x.png"],
                                                    ["/d/a", "/d/b", "/d/b"])) == ["a/x.png", "b/x.jpg.png",
                                                                                   "b/x.png.png"]


# ------------------------------------------------------------------------------------------------ checked first


def test_cheap_arguments_are_refused_before_the_model_loads(run, tmp_path, monkeypatch, capsys):
    workdir, data_root = run
    image = str(sorted((data_root / "valid").rglob("*.jpg"))[0])
    monkeypatch.setattr(trained, "load_model", _no_model)
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x")
    code = explain.main(["--workdir", str(workdir), "--images", image, "--output", str(tmp_path / "g"),
                         "--method", "gradcam"])
    _one_error(capsys, code, "--method gradcam: the dinov2 family")
    code = explain.main(["--workdir", str(workdir), "--images", image, "--output", str(tmp_path / "c"), "--class",
                         "Cardiomegaly "])
    _one_error(capsys, code, "--class 'Cardiomegaly ' is not a class of the model (No Finding, ")
    code = explain.main(["--workdir", str(workdir), "--images", image, "--output", str(a_file)])
    _one_error(capsys, code, f"--output {a_file}: a file; expected a folder")
    for args, expected in (
            (["--output", str(tmp_path)], f"--output {tmp_path}: a folder; expected a file"),
            (["--output", str(tmp_path / "p.csv"), "--metrics", str(tmp_path)], f"--metrics {tmp_path}: a folder"),
            (["--output", str(a_file / "p.csv")], f"{a_file} is a file, not a folder")):
        code = predict.main(["--workdir", str(workdir), "--images", image, "--no-progress", *args])
        _one_error(capsys, code, expected)
    code = export.main(["--workdir", str(workdir), "--output", str(a_file / "sub")])
    _one_error(capsys, code, f"{a_file} is a file")
    code = report.main([str(workdir), "--output", str(a_file)])
    _one_error(capsys, code, f"--output {a_file}: a file; expected a folder")
    assert not (tmp_path / "g").exists() and not (tmp_path / "c").exists() and not (tmp_path / "p.csv").exists()


def test_predict_announces_its_phases_and_warns_once_per_bad_file(run, tmp_path, capsys, caplog):
    workdir, data_root = run
    images = [str(p) for p in sorted((data_root / "valid").rglob("*.jpg"))[:2]]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    out = tmp_path / "preds.csv"
    assert predict.main(["--workdir", str(workdir), "--images", *images, str(broken), "--output", str(out),
                         "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert len([x for x in err.splitlines() if str(broken) in x]) == 1, err
    assert not [r for r in caplog.records if str(broken) in r.getMessage()]  # the loader's own line about it
    assert out.index(f"loading the model from {workdir} ...") < out.index("reading 3 image(s)") < out.index(
        "2 prediction(s) written")
    # an output nobody can write (/proc refuses new files): one error line, nothing left behind, no traceback
    code = predict.main(["--workdir", str(workdir), "--images", *images, "--output", "/proc/medjax_preds.csv",
                         "--no-progress"])
    _one_error(capsys, code, "/proc/medjax_preds.csv")


def test_a_run_config_holding_a_list_is_one_error_line(run, tmp_path, capsys):
    workdir, data_root = run
    bad = tmp_path / "run"
    bad.mkdir()
    (bad / "run_config.json").write_text("[1, 2]")
    code = predict.main(["--workdir", str(bad), "--images", str(data_root), "--output", str(tmp_path / "p.csv")])
    _one_error(capsys, code, f"{bad / 'run_config.json'}: holds a JSON list")


# ------------------------------------------------------------------------------------------------ report


def test_report_compare_refuses_nan_and_a_folder_output(run, tmp_path, capsys):
    workdir, _ = run
    z = dict(np.load(workdir / "test_predictions.npz"))
    z["probs"][3, 1] = np.nan
    nan = tmp_path / "nan.npz"
    np.savez(nan, **z)
    _one_error(capsys, report.main(["compare", str(workdir), str(nan)]), f"{nan}: field 'probs' holds 1 NaN")
    _one_error(capsys, report.main(["compare", str(workdir), str(workdir), "--output", str(tmp_path)]),
               f"--output {tmp_path}: a folder; expected a file")


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_report_figure_has_the_users_run_and_no_overlapping_labels(run, tmp_path, capsys):
    workdir, _ = run
    params = load_file(str(workdir / "backbone" / pretrained.PARAMS_FILE))  # the converted backbone, no head
    assert report.read_run(str(workdir / "metrics.json")).params_m == pytest.approx(
        sum(v.size for v in params.values()) / 1e6)
    runs = [report.read_run(str(workdir / "metrics.json"))]
    for name, (p, values) in report.STUDY.items():  # ours beside the study's: every label of the crowded region
        runs.append(report.Run(path=f"/runs/{name}", model=name, dataset="chexpert", target_metric="mean_auc",
                               head="linear", freeze="frozen", params_m=p, test=values["chexpert"] - 0.004))
    placed = report.plot_dataset(runs, "chexpert", "CheXpert mean AUC", str(tmp_path / "chexpert.png"))
    texts = [t for t, _ in placed["labels"]]
    assert workdir.name in texts and texts.count("MAE-B") == 2 and len(texts) == 2 * len(report.STUDY) + 1
    boxes = [b for _, b in placed["labels"]]
    clashes = [(texts[i], texts[j]) for i in range(len(boxes)) for j in range(i) if _overlap(boxes[i], boxes[j])]
    assert not clashes
    written = report.report([str(workdir)], str(tmp_path / "report"))
    rows = list(csv.DictReader(open(written["runs"])))
    assert float(rows[0]["params_m"]) > 0 and written["figures"]


# ------------------------------------------------------------------------------------------------ export


def test_stablehlo_export_records_its_preprocessing(run, tmp_path, capsys):
    import jax

    workdir, data_root = run
    out = tmp_path / "hlo"
    assert export.main(["--workdir", str(workdir), "--output", str(out), "--format", "stablehlo",
                        "--platforms", "cpu"]) == 0
    said = capsys.readouterr().out
    assert f"loading the model from {workdir} ..." in said and "writing the stablehlo export" in said
    info = json.load(open(out / export.FACTS_FILE))["input"]
    readme = (out / export.README_FILE).read_text()
    assert info["resize_interpolation"].startswith("bilinear") and info["scale"].startswith("uint8 / 255")
    for text in ("bilinear", "divide by 255", "center crop", "NHWC", "mean", "std"):
        assert text in readme
    # redo the documented preprocessing with Pillow alone and compare with the run's own test predictions
    z = np.load(workdir / "test_predictions.npz")
    paths = [str(data_root / p) for p in z["images"][:4]]
    size, resized = info["size"], info["resize"]
    assert info["resize_mode"] == "square" and info["center_crop"] == size
    batch = []
    for p in paths:
        img = Image.open(p).convert("RGB" if info["channels"] == 3 else "L").resize((resized, resized),
                                                                                    Image.Resampling.BILINEAR)
        off = round((resized - size) / 2)
        x = np.asarray(img.crop((off, off, off + size, off + size)), np.float32).reshape(size, size, -1) / 255
        batch.append((x - np.asarray(info["mean"], np.float32)) / np.asarray(info["std"], np.float32))
    f = jax.export.deserialize(open(out / export.STABLEHLO_FILE, "rb").read())
    probs = np.asarray(f.call(load_file(str(out / export.WEIGHTS_FILE)), np.stack(batch).astype(np.float32)))
    np.testing.assert_allclose(probs, z["probs"][:4], atol=2e-5)
    assert stat.S_IMODE(os.stat(out / export.WEIGHTS_FILE).st_mode) == _new_file_mode()


# ------------------------------------------------------------------------------------------------ the rest


def test_converted_weights_get_the_users_umask(run, tmp_path):
    workdir, _ = run  # converted by the demo run (umask of the test process)
    assert stat.S_IMODE(os.stat(workdir / "backbone" / pretrained.PARAMS_FILE).st_mode) == _new_file_mode()
    old = os.umask(0o027)
    try:
        pretrained.save(str(tmp_path / "b"), {"params": {"w": np.zeros(3, np.float32)}}, {"family": "x"})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "b" / pretrained.PARAMS_FILE).st_mode) == 0o640


def test_converter_suggests_the_model_name(tmp_path, capsys):
    from converters.__main__ import main

    code = main(["missing.pth", str(tmp_path / "out"), "--model", "dinov2_vitb14_regs"])
    _one_error(capsys, code, "did you mean dinov2_vitb14_reg4")
    assert not (tmp_path / "out").exists()


def test_prepare_prints_no_download_line(run, tmp_path, capsys):
    from medjax.data.__main__ import main

    _, data_root = run
    assert main(["prepare", "--dataset", "chexpert", "--root", str(data_root), "--output", str(tmp_path / "p")]) == 0
    out = capsys.readouterr()
    assert "ownload" not in out.out + out.err, out.err
    assert "chexpert: 96 images listed in" in out.err and "decoding and resizing them" in out.err
    assert json.loads(out.out.strip().splitlines()[-1])["written"] is True
