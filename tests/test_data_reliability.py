"""Issue 13, data side: paths outside the dataset root (item 4), empty or broken data files as one `error:` line
(item 8), corrupt images found before training or skipped and reported (item 3), the atomic synthetic-data writer
(item 10). Each test fails on the code before the fix."""

import csv
import json
import os

import numpy as np
import pytest

from medjax import data
from medjax.data import DataError, fake
from medjax.testing import error_line, run_cli, write_labels_csv, write_png

# ------------------------------------------------------------------------------------------ item 4: outside paths

@pytest.fixture
def outside(tmp_path):
    """A decodable image outside the dataset root tmp_path/root."""
    path = str(tmp_path / "secret" / "outside.png")
    write_png(path)
    return path


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "windows_dotdot"])
def test_csv_path_leaving_the_root_is_refused(tmp_path, outside, kind):
    root = str(tmp_path / "root")
    write_png(os.path.join(root, "images", "a.png"))
    value = {"dotdot": "../secret/outside.png", "absolute": outside,
             "windows_dotdot": "images\\..\\..\\secret\\outside.png"}[kind]
    write_labels_csv(root, [["images/a.png", "x"], [value, "y"]])
    with pytest.raises(DataError, match=r"labels.csv line 3: column 'image' .* leaves the dataset root .*"
                                        r"allow_outside_root=True"):
        data.get_dataset("csv", root)
    proc = run_cli("medjax.data", "describe", "--dataset", "csv", "--root", root, check=False)
    assert "labels.csv line 3" in error_line(proc) and "leaves the dataset root" in proc.stderr
    # opting in reads it (and the split file records where it came from)
    ds = data.get_dataset("csv", root, allow_outside_root=True, val_fraction=0.0, test_fraction=0.0,
                          workdir=str(tmp_path / "work"))
    assert os.path.normpath(ds.splits["train"][1].path) == outside


def test_dataset_readers_refuse_paths_leaving_the_root(tmp_path, outside):
    chex = fake.write("chexpert", str(tmp_path / "chex"), 6, size=16)["root"]
    path = os.path.join(chex, "train.csv")
    lines = open(path).read().splitlines()
    lines[2] = lines[2].replace("CheXpert-v1.0-small/train/", "CheXpert-v1.0-small/../../secret/", 1)
    open(path, "w").write("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train.csv line 3: column 'Path' .*\.\./\.\./secret.* leaves the dataset"):
        data.get_dataset("chexpert", chex)

    isic = fake.write("isic2019", str(tmp_path / "isic"), 6, size=16)["root"]
    path = os.path.join(isic, "ISIC_2019_Training_GroundTruth.csv")
    text = open(path).read()
    open(path, "w").write(text.replace("ISIC_0000003", "../../../secret/outside", 1))
    with pytest.raises(DataError, match=r"GroundTruth.csv line 5: column 'image' .* leaves the dataset root"):
        data.get_dataset("isic2019", isic)

    ddsm = fake.write("ddsm", str(tmp_path / "ddsm"), 6, size=16)["root"]
    with open(os.path.join(ddsm, "ddsm_raw_image_lists", "train.txt"), "a") as f:
        f.write("../../secret/normal_A_0999_1.LEFT_CC.png\n")
    with pytest.raises(DataError, match=r"train.txt line \d+: the listed image .* leaves the dataset root"):
        data.get_dataset("ddsm", ddsm)

    cbis = fake.write("cbis_ddsm", str(tmp_path / "cbis"), 4, size=16)["root"]
    path = os.path.join(cbis, "mass_case_description_train_set.csv")
    if len(open(path).read().splitlines()) < 2:
        path = os.path.join(cbis, "calc_case_description_train_set.csv")
    rows = list(csv.reader(open(path, newline="")))
    rows[1][rows[0].index("image file path")] = "../../secret/x/y/000000.dcm"
    csv.writer(open(path, "w", newline="")).writerows(rows)
    with pytest.raises(DataError, match=r"set.csv line \d+: column 'image file path' .* leaves the dataset root"):
        data.get_dataset("cbis_ddsm", cbis)


def test_symlinked_folder_inside_the_root_stays_allowed(tmp_path):
    store = tmp_path / "store"
    write_png(str(store / "a.png"))
    write_png(str(store / "b.png"))
    root = str(tmp_path / "root")
    os.makedirs(root)
    os.symlink(store, os.path.join(root, "images"))
    write_labels_csv(root, [["images/a.png", "x"], ["./images/b.png", "y"]])
    # the link leads outside the root: allowed with allow_outside_root only (issue 23; tests/test_hardening.py)
    ds = data.get_dataset("csv", root, val_fraction=0.0, test_fraction=0.0, check_images="decode",
                          allow_outside_root=True)
    assert [r.path for r in ds.splits["train"]] == [os.path.join(root, "images", n) for n in ("a.png", "b.png")]


# ------------------------------------------------------------------------------------------ item 8: clear errors

@pytest.mark.parametrize("content, expected", [
    ("", r"train_1.csv: empty file; expected a header row with the column\(s\) 'id_code', 'diagnosis'"),
    ("id_code,diagnosis\n", r"train_1.csv: no data rows, only the header; expected one row per image"),
    ("id_code,diagnosis\n\n,\n", r"train_1.csv: no data rows, only the header"),
    (b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary", r"train_1.csv: not a UTF-8 text CSV"),
])
def test_empty_header_only_or_binary_csv(tmp_path, content, expected):
    root = tmp_path / "aptos"
    (root / "train_images" / "train_images").mkdir(parents=True)
    (root / "train_1.csv").write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=expected):
        data.get_dataset("aptos2019", str(root))
    line = error_line(run_cli("medjax.data", "describe", "--dataset", "aptos2019", "--root", str(root),
                               check=False))
    assert "train_1.csv" in line


def test_header_only_chexpert_and_empty_lists_are_errors_not_empty_splits(tmp_path):
    chex = fake.write("chexpert", str(tmp_path / "chex"), 6, size=16)["root"]
    path = os.path.join(chex, "train.csv")
    header = open(path).readline()
    open(path, "w").write(header)
    proc = run_cli("medjax.data", "describe", "--dataset", "chexpert", "--root", chex, check=False)
    assert "train.csv: no data rows" in error_line(proc) and proc.stdout == ""
    ddsm = fake.write("ddsm", str(tmp_path / "ddsm"), 6, size=16)["root"]
    open(os.path.join(ddsm, "ddsm_raw_image_lists", "train.txt"), "w").write("\n")
    with pytest.raises(DataError, match=r"train.txt: lists no image"):
        data.get_dataset("ddsm", ddsm)
    folder = tmp_path / "folder"
    (folder / "cats").mkdir(parents=True)
    with pytest.raises(DataError, match=r"folder: no images"):
        data.get_dataset("folder", str(folder))


def test_missing_image_is_one_error_line_naming_file_and_row(tmp_path):
    root = fake.write("aptos2019", str(tmp_path / "aptos"), 6, size=16)["root"]
    code = open(os.path.join(root, "train_1.csv")).read().splitlines()[3].split(",")[0]
    os.remove(os.path.join(root, "train_images", "train_images", f"{code}.png"))
    work = tmp_path / "work"
    line = error_line(run_cli("medjax.data", "describe", "--dataset", "aptos2019", "--root", root,
                               "--workdir", str(work), check=False))
    assert f"{code}.png" in line and "train_1.csv line 4" in line and "file not found" in line
    assert not work.exists()  # nothing written


def test_fake_cli_bad_arguments_are_error_lines(tmp_path):
    line = error_line(run_cli("medjax.data", "fake", "--dataset", "aptos2019", "--root", str(tmp_path / "x"),
                               "--num", "0", check=False))
    assert "num" in line and "positive" in line
    (tmp_path / "file").write_text("x")
    line = error_line(run_cli("medjax.data", "fake", "--dataset", "aptos2019", "--root", str(tmp_path / "file"),
                               "--num", "2", check=False))
    assert "file" in line


# ------------------------------------------------------------------------------------------ item 3: corrupt images

def _truncate(path):
    content = open(path, "rb").read()
    open(path, "wb").write(content[: len(content) // 2])


@pytest.fixture
def chex(tmp_path):
    return fake.write("chexpert", str(tmp_path / "chex"), 12, seed=3, size=32)["root"]


def test_truncated_jpegs_are_all_reported_before_training_by_default(chex, tmp_path):
    ds = data.get_dataset("chexpert", chex)
    bad = [ds.splits["train"][0], ds.splits["train"][-1]]
    for r in bad:
        _truncate(r.path)
    work = tmp_path / "work"
    with pytest.raises(DataError) as err:
        data.get_dataset("chexpert", chex, workdir=str(work))
    message = str(err.value)
    assert message.startswith(f"2 of {sum(map(len, ds.splits.values()))} images cannot be read (verify check): ")
    for r in bad:
        assert f"{r.path} ({r.origin}): cannot decode (OSError: " in message
    assert "skip_bad_images=True" in message and "\n" not in message
    assert not work.exists()  # a refused start writes nothing
    line = error_line(run_cli("medjax.data", "describe", "--dataset", "chexpert", "--root", chex, check=False))
    assert all(os.path.basename(r.path) in line for r in bad)

    # skip and report: left out of the splits, listed in the split file and in skipped_images
    ds = data.get_dataset("chexpert", chex, workdir=str(work), skip_bad_images=True)
    paths = [r.path for recs in ds.splits.values() for r in recs]
    assert not any(r.path in paths for r in bad)
    saved = json.load(open(ds.split_file))["skipped"]
    assert [s["image"] for s in saved] == [os.path.relpath(r.path, chex) for r in bad]
    assert [(s["image"], s["origin"], s["found"]) for s in ds.skipped_images] == [
        (os.path.relpath(r.path, chex), r.origin, "start-up check") for r in bad]


def test_the_check_is_cached_in_the_workdir(chex, tmp_path, monkeypatch):
    from medjax.data import checks

    calls = []
    real = checks._reason
    monkeypatch.setattr(checks, "_reason", lambda path, *a: calls.append(path) or real(path, *a))
    work = str(tmp_path / "work")
    ds = data.get_dataset("chexpert", chex, workdir=work)
    n = sum(map(len, ds.splits.values()))
    assert len(calls) == n and os.path.isfile(os.path.join(work, "splits", "chexpert.checked.json"))
    calls.clear()
    data.get_dataset("chexpert", chex, workdir=work)  # a resume: nothing checked again
    assert calls == []
    changed = ds.splits["val"][0].path
    content = open(changed, "rb").read()
    _truncate(changed)
    with pytest.raises(DataError, match="1 of"):
        data.get_dataset("chexpert", chex, workdir=work)
    assert calls == [changed]  # only the changed file
    open(changed, "wb").write(content)
    calls.clear()
    data.get_dataset("chexpert", chex, workdir=work, check_images="decode")  # a stricter level checks all again
    assert sorted(calls) == sorted(r.path for recs in ds.splits.values() for r in recs)


def test_an_image_broken_during_training_never_stops_the_run(chex, tmp_path):
    work = str(tmp_path / "work")
    ds = data.get_dataset("chexpert", chex, workdir=work)
    victim = ds.splits["train"][2]
    _truncate(victim.path)  # after the start-up check
    loader = data.make_loader(ds, "train", batch_size=2, image_size=16, train=True, num_epochs=3, shard_index=0,
                              shard_count=1)
    masks = np.concatenate([b["mask"] for b in loader])
    assert (~masks).sum() == 3  # once per epoch, a masked row; every other row is real
    assert [(s["image"], s["found"]) for s in ds.skipped_images] == [(os.path.relpath(victim.path, chex), "loading")]
    # a resumed run (a new Dataset on the same work directory) still reports it, from the log in the workdir
    resumed = data.get_dataset("chexpert", chex, workdir=work, check_images="exists")
    assert [s["image"] for s in resumed.skipped_images] == [os.path.relpath(victim.path, chex)]
    log_lines = open(os.path.join(work, "splits", "chexpert.skipped_while_loading.jsonl")).read().splitlines()
    assert len(log_lines) == 1 and json.loads(log_lines[0])["origin"] == victim.origin


# ------------------------------------------------------------------------------------------ item 10: atomic writer

_WRITER = """
import json, os, sys, time
from medjax.data import fake
while not os.path.exists(sys.argv[2]):
    time.sleep(0.002)
print(json.dumps(fake.write_once("chexpert", sys.argv[1], 24, seed=5, size=24)))
"""


def test_concurrent_synthetic_writers_share_one_complete_folder(tmp_path):
    import subprocess
    import sys

    from medjax.testing import ROOT

    root, go = str(tmp_path / "cache" / "CheXpert-v1.0-small"), str(tmp_path / "go")
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, root, go], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    open(go, "w").close()  # start together
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    assert sum(r["written"] for r in results) == 1  # one winner; the others use its folder
    assert {r["root"] for r in results} == {root} and {r["images"] for r in results} == {27}
    assert os.listdir(tmp_path / "cache") == ["CheXpert-v1.0-small"]  # no temporary folder left behind
    ds = data.get_dataset("chexpert", root, check_images="decode")
    assert sum(map(len, ds.splits.values())) == 24
    again = fake.write_once("chexpert", root, 24, seed=5, size=24)
    assert again["written"] is False and again["images"] == 27
    with pytest.raises(DataError, match="holds synthetic data written with .*'seed': 5.*not .*'seed': 6"):
        fake.write_once("chexpert", root, 24, seed=6, size=24)


def test_a_failed_synthetic_write_leaves_nothing(tmp_path, monkeypatch):
    def broken(root, num, rng, size):
        fake.write_aptos2019(root, 1, rng, size)
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(fake.WRITERS, "aptos2019", broken)
    with pytest.raises(OSError):
        fake.write_once("aptos2019", str(tmp_path / "aptos"), 4)
    assert os.listdir(tmp_path) == []


def test_folder_reader_follows_symlinked_subfolders_once(tmp_path):
    store = tmp_path / "store"
    write_png(str(store / "b.png"))
    root = tmp_path / "root"
    write_png(str(root / "cats" / "a.png"))
    os.symlink(store, root / "cats" / "more")  # a symlinked folder inside the root
    os.symlink(root / "cats", store / "loop")  # and a loop back
    ds = data.get_dataset("folder", str(root), val_fraction=0.0, test_fraction=0.0, allow_outside_root=True)
    assert sorted(os.path.relpath(r.path, root) for r in ds.splits["train"]) == ["cats/a.png", "cats/more/b.png"]
