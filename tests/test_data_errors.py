"""Bad input: every error names the file (and row) and says what was expected; skip_bad_images skips and counts."""

import json
import os
import shutil

import numpy as np
import pytest

from medjax import data
from medjax.data import DataError, fake
from medjax.testing import run_cli


@pytest.fixture
def aptos(tmp_path):
    return fake.write("aptos2019", str(tmp_path / "aptos"), 12, seed=0, size=24)["root"]


def _csv_lines(path):
    return open(path).read().splitlines()


def _write_lines(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def test_missing_root_and_unknown_names(tmp_path):
    with pytest.raises(DataError, match=r"nowhere: does not exist; expected the CheXpert-v1.0-small folder"):
        data.get_dataset("chexpert", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="unknown dataset 'mnist'; known: chexpert, ddsm"):
        data.get_dataset("mnist", str(tmp_path))
    with pytest.raises(DataError, match="no option 'uncertian'; its options: uncertain, frontal_only"):
        data.get_dataset("chexpert", str(tmp_path), uncertian="ones")
    with pytest.raises(DataError, match=r"train_1.csv: file not found"):
        data.get_dataset("aptos2019", str(tmp_path))


def test_missing_column(aptos):
    csv_path = os.path.join(aptos, "train_1.csv")
    lines = _csv_lines(csv_path)
    _write_lines(csv_path, ["id_code,grade", *lines[1:]])
    with pytest.raises(DataError, match=r"train_1.csv: missing column\(s\) 'diagnosis'; found 'id_code', 'grade'"):
        data.get_dataset("aptos2019", aptos)


def test_label_outside_classes(aptos, tmp_path):
    csv_path = os.path.join(aptos, "train_1.csv")
    lines = _csv_lines(csv_path)
    lines[3] = lines[3].split(",")[0] + ",7"
    _write_lines(csv_path, lines)
    with pytest.raises(DataError, match=r"train_1.csv line 4: diagnosis '7' is not a grade 0-4"):
        data.get_dataset("aptos2019", aptos)
    root = fake.write("csv", str(tmp_path / "own"), 6, size=16)["root"]
    with pytest.raises(DataError, match=r"labels.csv line 2: label 'class_\w' is not one of the classes"):
        data.get_dataset("csv", root, class_names=["cat", "dog"])


def test_chexpert_bad_cell(tmp_path):
    root = fake.write("chexpert", str(tmp_path / "chex"), 6, size=16)["root"]
    csv_path = os.path.join(root, "train.csv")
    lines = _csv_lines(csv_path)
    lines[2] = lines[2] + "x"  # the last finding's cell gets a stray character
    _write_lines(csv_path, lines)
    with pytest.raises(DataError, match=r"train.csv line 3: column 'Support Devices' holds '.*x'"):
        data.get_dataset("chexpert", root)


def test_missing_image_raises_or_is_skipped_and_counted(aptos, tmp_path):
    code = _csv_lines(os.path.join(aptos, "train_1.csv"))[5].split(",")[0]
    missing = os.path.join(aptos, "train_images", "train_images", f"{code}.png")
    os.remove(missing)
    with pytest.raises(DataError, match=rf"{code}.png \(.*train_1.csv line 6\): file not found"):
        data.get_dataset("aptos2019", aptos)
    ds = data.get_dataset("aptos2019", aptos, skip_bad_images=True, workdir=str(tmp_path / "work"))
    assert [(p, why) for p, _, why in ds.skipped] == [(missing, "file not found")]
    assert sum(len(r) for r in ds.splits.values()) == 11
    saved = json.load(open(ds.split_file))
    assert saved["skipped"][0]["origin"].endswith("train_1.csv line 6")
    proc = run_cli("medjax.data", "describe", "--dataset", "aptos2019", "--root", aptos, "--skip-bad-images")
    assert "skipped 1 bad image(s)" in proc.stderr and f"{code}.png" in proc.stderr
    assert sum(s["images"] for s in json.loads(proc.stdout)["splits"].values()) == 11
    proc = run_cli("medjax.data", "describe", "--dataset", "aptos2019", "--root", aptos, check=False)
    assert proc.returncode == 2 and "file not found" in proc.stderr and "line 6" in proc.stderr


def test_corrupt_image(aptos, tmp_path):
    ds = data.get_dataset("aptos2019", aptos)
    bad = ds.splits["train"][1]
    data_bytes = open(bad.path, "rb").read()
    with open(bad.path, "wb") as f:
        f.write(data_bytes[: len(data_bytes) // 2])  # truncated PNG
    # up front: the default check finds it before training starts
    name, line = os.path.basename(bad.path), bad.origin.split("/")[-1]
    with pytest.raises(DataError, match=rf"1 of 12 images cannot be read \(verify check\): .*{name} \(.*{line}\): "
                                        r"cannot decode"):
        data.get_dataset("aptos2019", aptos)
    with pytest.raises(DataError, match=rf"{os.path.basename(bad.path)} .*cannot decode"):
        data.get_dataset("aptos2019", aptos, check_images="decode")
    checked = data.get_dataset("aptos2019", aptos, skip_bad_images=True)
    assert [p for p, _, _ in checked.skipped] == [bad.path]
    # found only while loading (check off): the row becomes padding (mask False), the rest is intact, the run goes on
    # and the image is listed in skipped_images
    lenient = data.get_dataset("aptos2019", aptos, check_images="exists", workdir=str(tmp_path / "work"))
    kw = dict(batch_size=4, image_size=16, train=False, shard_index=0, shard_count=1)
    batches = list(data.make_loader(lenient, "train", **kw))
    mask = np.concatenate([b["mask"] for b in batches])
    assert not mask[1] and mask.sum() == len(lenient.splits["train"]) - 1
    assert [(s["image"], s["found"]) for s in lenient.skipped_images] == [
        (os.path.relpath(bad.path, aptos), "loading")]
    assert lenient.skipped_images[0]["reason"].startswith("cannot decode (OSError")


def test_not_an_image(aptos):
    ds = data.get_dataset("aptos2019", aptos)
    with open(ds.splits["val"][0].path, "w") as f:
        f.write("this is not a PNG")
    with pytest.raises(DataError, match=r"cannot decode \(UnidentifiedImageError"):
        data.get_dataset("aptos2019", aptos)
    batches = list(data.make_loader(ds, "val", batch_size=2, image_size=16, train=False, shard_index=0,
                                    shard_count=1))
    assert not batches[0]["mask"][0]
    assert ds.skipped_images[0]["reason"].startswith("cannot decode (UnidentifiedImageError")


def test_ddsm_unlabelled_name_and_missing_lists(tmp_path):
    root = fake.write("ddsm", str(tmp_path / "ddsm"), 8, size=16)["root"]
    lists = os.path.join(root, "ddsm_raw_image_lists")
    with open(os.path.join(lists, "val.txt"), "a") as f:
        f.write("scan_A_0999_1.LEFT_CC.png\n")
    with pytest.raises(DataError, match=r"val.txt line \d+: file name 'scan_A_0999_1.LEFT_CC.png' does not start "
                                        "with normal_, benign_ or cancer_"):
        data.get_dataset("ddsm", root)
    shutil.rmtree(lists)
    with pytest.raises(DataError, match="ddsm_raw_image_lists: does not exist"):
        data.get_dataset("ddsm", root)


def test_cbis_ddsm_unknown_pathology_and_missing_dicom(tmp_path):
    root = fake.write("cbis_ddsm", str(tmp_path / "cbis"), 6, size=16)["root"]
    path = os.path.join(root, "mass_case_description_train_set.csv")
    if len(_csv_lines(path)) < 2:
        path = os.path.join(root, "calc_case_description_train_set.csv")
    text = open(path).read()
    bad = text.replace("BENIGN", "UNKNOWN", 1) if "BENIGN" in text else text.replace("MALIGNANT", "UNKNOWN", 1)
    open(path, "w").write(bad)
    with pytest.raises(DataError, match=r"case_description_train_set.csv line \d+: pathology 'UNKNOWN'"):
        data.get_dataset("cbis_ddsm", root)
    open(path, "w").write(text)
    ds = data.get_dataset("cbis_ddsm", root)
    victim = ds.splits["train"][0]
    series = victim.path.split(os.sep + "CBIS-DDSM" + os.sep)[1].split(os.sep)[0]
    shutil.rmtree(os.path.join(root, "CBIS-DDSM", series))
    with pytest.raises(DataError, match=rf"{series}.*\(.*case_description_\w+_set.csv line \d+\): file not found"):
        data.get_dataset("cbis_ddsm", root)


def test_loader_arguments(aptos):
    ds = data.get_dataset("aptos2019", aptos)
    with pytest.raises(DataError, match="has no split 'validation'; it has \\['train', 'val', 'test'\\]"):
        data.make_loader(ds, "validation", batch_size=2, train=False, shard_index=0, shard_count=1)
    with pytest.raises(DataError, match="fewer than one batch of 64"):
        data.make_loader(ds, "train", batch_size=64, train=True, shard_index=0, shard_count=1)
    with pytest.raises(DataError, match="normalization='imagenet21k'"):
        data.make_loader(ds, "train", batch_size=2, train=True, normalization="imagenet21k", shard_index=0,
                         shard_count=1)
