"""The companion studies' datasets (issue 15 item 1): each layout is written here by hand, independently of
medjax.data.fake, then read: counts, labels, patient/lesion disjointness, split files, statistics and clear errors.
The synthetic writers are checked through `describe` as a user would run them."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from medjax import data
from medjax.data import DataError
from medjax.data.__main__ import main as data_cli

NEW = ["nih_chestxray14", "chest_xray_pneumonia", "ham10000", "isic2018", "ichallenge_amd", "brain_tumor_figshare"]


def _img(path, mode="L", value=100, size=(20, 16), fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(abs(hash(path)) % 2 ** 32)
    arr = np.clip(rng.normal(value, 20, size[::-1] + ((3,) if mode == "RGB" else ())), 0, 255).astype(np.uint8)
    Image.fromarray(arr, mode).save(path, format=fmt)


def _csv(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def _all(ds):
    return [r for recs in ds.splits.values() for r in recs]


def _disjoint(ds):
    seen = {}
    for split, recs in ds.splits.items():
        for r in recs:
            assert seen.setdefault(r.patient, split) == split or r.patient is None, (r.patient, split)


# ------------------------------------------------------------------------------------------------ NIH ChestX-ray14

def _nih(root, entries, train_val, test, kaggle=True, v2020=False):
    """entries: (image, labels, patient)."""
    header = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
    name = "Data_Entry_2017_v2020.csv" if v2020 else "Data_Entry_2017.csv"
    lines = [header] + [f"{img},{labels},0,{pid},45,M,PA,2500,2048,0.143,0.143," for img, labels, pid in entries]
    os.makedirs(root, exist_ok=True)
    (root / name).write_text("\n".join(lines) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    for i, (img, _, _) in enumerate(entries):
        folder = root / (f"images_{1 + i % 2:03d}/images" if kaggle else "images")
        _img(str(folder / img))


def test_nih_labels_lists_and_patient_disjoint_val(tmp_path):
    root = tmp_path / "nih"
    entries = [(f"{p:08d}_{k:03d}.png", labels, str(p)) for p, k, labels in [
        (1, 0, "Cardiomegaly|Effusion"), (1, 1, "No Finding"), (2, 0, "Hernia"), (3, 0, "No Finding"),
        (4, 0, "Mass|Nodule|Pneumothorax"), (4, 1, "Pleural_Thickening"), (5, 0, "Infiltration"),
        (6, 0, "No Finding"), (7, 0, "Edema")]]
    names = [e[0] for e in entries]
    train_val = [n for n in names if not n.startswith(("00000005", "00000007"))]
    _nih(root, entries, train_val, ["00000005_000.png", "00000007_000.png"])
    ds = data.get_dataset("nih_chestxray14", str(root), val_fraction=0.3, seed=2, workdir=str(tmp_path / "w"))
    assert ds.task == "multilabel" and ds.channels == 1 and ds.target_metric == "mean_auc"
    assert len(ds.class_names) == 14 and ds.class_names[1] == "Cardiomegaly"
    by_name = {os.path.basename(r.path): r for r in _all(ds)}
    hot = lambda *names: tuple(int(c in names) for c in ds.class_names)  # noqa: E731
    assert by_name["00000001_000.png"].label == hot("Cardiomegaly", "Effusion")
    assert by_name["00000001_001.png"].label == hot() and by_name["00000004_000.png"].label == hot(
        "Mass", "Nodule", "Pneumothorax")
    assert sorted(os.path.basename(r.path) for r in ds.splits["test"]) == ["00000005_000.png", "00000007_000.png"]
    assert len(ds.splits["train"]) + len(ds.splits["val"]) == 7 and ds.splits["val"]
    _disjoint(ds)
    assert by_name["00000002_000.png"].path == str(root / "images_001" / "images" / "00000002_000.png")
    saved = json.load(open(ds.split_file))
    assert saved["counts"] == {s: len(r) for s, r in ds.splits.items()}
    assert saved["statistics"]["source"].startswith("computed over")
    # the radiology study's rule: the last images of train_val_list, whole patients, and No Finding as a 15th class
    last = data.get_dataset("nih_chestxray14", str(root), val_rule="last", val_images=2, no_finding_class=True)
    assert [os.path.basename(r.path) for r in last.splits["val"]] == ["00000004_000.png", "00000004_001.png",
                                                                       "00000006_000.png"]
    assert last.class_names[-1] == "No Finding" and len(last.splits["train"][1].label) == 15
    assert last.splits["train"][1].label[-1] == 1  # 00000001_001 has no finding


def test_nih_errors_and_exclusions(tmp_path):
    root = tmp_path / "nih"
    entries = [("00000001_000.png", "Effusion", "1"), ("00000002_000.png", "No Finding", "2"),
               ("00000003_000.png", "Atelectasis", "3"), ("00000004_000.png", "Mass", "4")]
    _nih(root, entries, ["00000001_000.png", "00000002_000.png", "00000003_000.png"], ["00000003_000.png"],
         kaggle=False, v2020=True)
    ds = data.get_dataset("nih_chestxray14", str(root), val_fraction=0.0)
    assert {os.path.basename(p): why for p, _, why in ds.excluded} == {
        "00000003_000.png": "patient 3 is also in test_list.txt",
        "00000004_000.png": "in neither train_val_list.txt nor test_list.txt"}
    text = (root / "Data_Entry_2017_v2020.csv").read_text()
    (root / "Data_Entry_2017_v2020.csv").write_text(text.replace("Effusion", "Effusion|Covid"))
    with pytest.raises(DataError, match=r"Data_Entry_2017_v2020.csv line 2: Finding Labels 'Effusion\|Covid': "
                                        "expected 'No Finding' or findings"):
        data.get_dataset("nih_chestxray14", str(root))
    (root / "Data_Entry_2017_v2020.csv").write_text(text)
    (root / "test_list.txt").write_text("00000009_000.png\n")
    with pytest.raises(DataError, match=r"test_list.txt line 1: image 00000009_000.png has no row in "
                                        r"Data_Entry_2017_v2020.csv"):
        data.get_dataset("nih_chestxray14", str(root))
    (root / "test_list.txt").write_text("../00000003_000.png\n")
    with pytest.raises(DataError, match=r"test_list.txt line 1: '../00000003_000.png' is not an image file name"):
        data.get_dataset("nih_chestxray14", str(root))
    (root / "test_list.txt").write_text("00000003_000.png\n")
    os.remove(root / "images" / "00000001_000.png")
    with pytest.raises(DataError, match=r"00000001_000.png \(.*Data_Entry_2017_v2020.csv line 2\): file not found"):
        data.get_dataset("nih_chestxray14", str(root))
    os.remove(root / "train_val_list.txt")
    with pytest.raises(DataError, match=r"train_val_list.txt: file not found"):
        data.get_dataset("nih_chestxray14", str(root))


# ------------------------------------------------------------------------------------------------ pediatric pneumonia

def _pneumonia(root, files):
    """files: (split, folder, name)."""
    for split, folder, name in files:
        _img(str(root / "chest_xray" / split / folder / name), fmt="JPEG")


PNEUMONIA_FILES = [
    ("train", "NORMAL", "IM-0115-0001.jpeg"), ("train", "NORMAL", "IM-0115-0002.jpeg"),
    ("train", "NORMAL", "NORMAL2-IM-0381-0001.jpeg"), ("train", "NORMAL", "IM-0117-0001.jpeg"),
    ("train", "PNEUMONIA", "person1_bacteria_1.jpeg"), ("train", "PNEUMONIA", "person1_virus_6.jpeg"),
    ("train", "PNEUMONIA", "person2_bacteria_3.jpeg"), ("train", "PNEUMONIA", "person3_virus_7.jpeg"),
    ("val", "NORMAL", "NORMAL2-IM-1427-0001.jpeg"), ("val", "PNEUMONIA", "person4_bacteria_9.jpeg"),
    ("test", "NORMAL", "IM-0001-0001.jpeg"), ("test", "PNEUMONIA", "person5_virus_11.jpeg"),
    ("test", "PNEUMONIA", "person2_bacteria_40.jpeg")]  # person2 is also in train: excluded there


def test_pneumonia_official_test_patient_disjoint_val_and_three_classes(tmp_path):
    _pneumonia(tmp_path / "kaggle", PNEUMONIA_FILES)
    os.makedirs(tmp_path / "kaggle" / "__MACOSX" / "chest_xray")
    ds = data.get_dataset("chest_xray_pneumonia", str(tmp_path / "kaggle"), seed=1)
    assert ds.class_names == ["normal", "pneumonia"] and ds.channels == 1 and ds.target_metric == "roc_auc"
    test = sorted((os.path.basename(r.path), r.label) for r in ds.splits["test"])
    assert test == [("IM-0001-0001.jpeg", 0), ("person2_bacteria_40.jpeg", 1), ("person5_virus_11.jpeg", 1)]
    assert [os.path.basename(p) for p, _, _ in ds.excluded] == ["person2_bacteria_3.jpeg"]
    assert len(ds.splits["train"]) + len(ds.splits["val"]) == 9 and ds.splits["val"]
    _disjoint(ds)
    patients = {os.path.basename(r.path): r.patient for r in _all(ds)}
    assert patients["person1_bacteria_1.jpeg"] == patients["person1_virus_6.jpeg"] == "PNEUMONIA/person1"
    assert patients["IM-0115-0001.jpeg"] == patients["IM-0115-0002.jpeg"] == "NORMAL/IM-0115"
    three = data.get_dataset("chest_xray_pneumonia", str(tmp_path / "kaggle" / "chest_xray"), classes=3)
    labels = {os.path.basename(r.path): r.label for r in _all(three)}
    assert labels["person1_bacteria_1.jpeg"] == 1 and labels["person1_virus_6.jpeg"] == 2
    assert labels["NORMAL2-IM-0381-0001.jpeg"] == 0 and three.target_metric == "balanced_accuracy"


def test_pneumonia_errors(tmp_path):
    root = tmp_path / "p"
    _pneumonia(root, PNEUMONIA_FILES + [("train", "PNEUMONIA", "person9_fungal_1.jpeg")])
    assert data.get_dataset("chest_xray_pneumonia", str(root))  # 2 classes: any pneumonia file is pneumonia
    with pytest.raises(DataError, match=r"person9_fungal_1.jpeg: file name 'person9_fungal_1.jpeg' says neither "
                                        "bacteria nor virus"):
        data.get_dataset("chest_xray_pneumonia", str(root), classes=3)
    _img(str(root / "chest_xray" / "train" / "COVID" / "x.jpeg"), fmt="JPEG")
    with pytest.raises(DataError, match=r"train/COVID: folder 'COVID' is not a class of this dataset; expected "
                                        "NORMAL and PNEUMONIA"):
        data.get_dataset("chest_xray_pneumonia", str(root))
    with pytest.raises(DataError, match=r"no train/ and test/ folders"):
        data.get_dataset("chest_xray_pneumonia", str(tmp_path))
    with pytest.raises(DataError, match=r"option classes='3': expected int"):
        data.get_dataset("chest_xray_pneumonia", str(root), classes="3")


# ------------------------------------------------------------------------------------------------ HAM10000, ISIC 2018

def test_ham10000_lesion_disjoint(tmp_path):
    root = tmp_path / "ham"
    rows, classes = [], ["nv", "mel", "bkl", "bcc", "akiec", "vasc", "df"]
    for i in range(24):
        lesion = f"HAM_{i // 3:07d}"  # three images per lesion
        rows.append([lesion, f"ISIC_{24306 + i:07d}", classes[(i // 3) % 7], "histo", 50, "male", "back"])
        part = "HAM10000_images_part_1" if i < 12 else "ham10000_images_part_2"
        _img(str(root / part / f"ISIC_{24306 + i:07d}.jpg"), "RGB", fmt="JPEG")
    _csv(str(root / "HAM10000_metadata.csv"), ["lesion_id", "image_id", "dx", "dx_type", "age", "sex",
                                                "localization"], rows)
    ds = data.get_dataset("ham10000", str(root), val_fraction=0.25, test_fraction=0.25, seed=3)
    assert ds.class_names == ["mel", "nv", "bcc", "akiec", "bkl", "df", "vasc"] and ds.channels == 3
    assert sum(map(len, ds.splits.values())) == 24 and all(len(v) % 3 == 0 for v in ds.splits.values())
    _disjoint(ds)
    labels = {os.path.basename(r.path): ds.class_names[r.label] for r in _all(ds)}
    assert labels["ISIC_0024306.jpg"] == "nv" and labels["ISIC_0024326.jpg"] == "df"
    assert ds.mean == (0.7630, 0.5456, 0.5700) and ds.statistics_source == "published"
    rows[4][2] = "melanoma"
    _csv(str(root / "HAM10000_metadata.csv"), ["lesion_id", "image_id", "dx", "dx_type", "age", "sex",
                                                "localization"], rows)
    with pytest.raises(DataError, match=r"HAM10000_metadata.csv line 6: dx 'melanoma' is not one of the 7 classes"):
        data.get_dataset("ham10000", str(root))


def test_isic2018_official_splits_and_fallback(tmp_path):
    root = tmp_path / "isic2018"
    classes = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]

    def write(which, ids):
        name = f"ISIC2018_Task3_{which}_GroundTruth"
        _csv(str(root / name / f"{name}.csv"), ["image", *classes],
             [[f"ISIC_{i:07d}"] + ["1.0" if j == i % 7 else "0.0" for j in range(7)] for i in ids])
        for i in ids:
            _img(str(root / f"ISIC2018_Task3_{which}_Input" / f"ISIC_{i:07d}.jpg"), "RGB", fmt="JPEG")

    write("Training", range(20))
    _csv(str(root / "ISIC2018_Task3_Training_LesionGroupings.csv"), ["image", "lesion_id", "diagnosis_confirm_type"],
         [[f"ISIC_{i:07d}", f"HAM_{i // 2:07d}", "histopathology"] for i in range(20)])
    drawn = data.get_dataset("isic2018", str(root), val_fraction=0.2, test_fraction=0.2)
    assert sum(map(len, drawn.splits.values())) == 20 and drawn.splits["test"]
    _disjoint(drawn)  # lesions of two images stay together
    write("Validation", range(100, 104))
    write("Test", range(200, 207))
    ds = data.get_dataset("isic2018", str(root))
    assert len(ds.splits["train"]) == 20 and len(ds.splits["val"]) == 4 and len(ds.splits["test"]) == 7
    assert [r.label for r in ds.splits["test"]] == [i % 7 for i in range(200, 207)]
    assert ds.options["official"] == ["val", "test"]
    bad = root / "ISIC2018_Task3_Test_GroundTruth" / "ISIC2018_Task3_Test_GroundTruth.csv"
    text = bad.read_text().splitlines()
    text[2] = text[2].replace("0.0", "1.0", 1)
    bad.write_text("\n".join(text) + "\n")
    with pytest.raises(DataError, match=r"Test_GroundTruth.csv line 3: expected exactly one of MEL, NV, .* set to 1"):
        data.get_dataset("isic2018", str(root))


# ------------------------------------------------------------------------------------------------ iChallenge-AMD

def test_ichallenge_amd(tmp_path):
    base = tmp_path / "Training400"
    for i in range(1, 7):
        _img(str(base / "AMD" / f"A{i:04d}.jpg"), "RGB", fmt="JPEG")
    for i in range(1, 15):
        _img(str(base / "Non-AMD" / f"N{i:04d}.jpg"), "RGB", fmt="JPEG")
    ds = data.get_dataset("ichallenge_amd", str(tmp_path))
    same = data.get_dataset("ichallenge_amd", str(base))
    assert [r.path for r in _all(ds)] == [r.path for r in _all(same)]
    assert sum(map(len, ds.splits.values())) == 20 and ds.target_metric == "roc_auc"
    labels = {os.path.basename(r.path): r.label for r in _all(ds)}
    assert labels["A0003.jpg"] == 1 and labels["N0014.jpg"] == 0
    assert data.get_dataset("ichallenge_amd", str(tmp_path), seed=1).splits["test"] != ds.splits["test"]
    _img(str(base / "Non-AMD" / "A0099.jpg"), "RGB", fmt="JPEG")
    with pytest.raises(DataError, match=r"Non-AMD/A0099.jpg: an AMD file name in the Non-AMD/ folder"):
        data.get_dataset("ichallenge_amd", str(tmp_path))
    os.remove(base / "Non-AMD" / "A0099.jpg")
    _img(str(base / "Glaucoma" / "G0001.jpg"), "RGB", fmt="JPEG")
    with pytest.raises(DataError, match=r"Glaucoma: folder 'Glaucoma' is not a class"):
        data.get_dataset("ichallenge_amd", str(tmp_path))


# ------------------------------------------------------------------------------------------------ Figshare brain tumour

def _mat(path, image, label, pid):
    """A MATLAB v7.3 file as MATLAB writes it: HDF5 after a 512-byte header, arrays stored transposed."""
    import h5py

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with h5py.File(path, "w", userblock_size=512) as f:
        cj = f.create_group("cjdata")
        cj["image"] = image.T.astype(np.int16)
        cj["label"] = np.array([[float(label)]])
        cj["PID"] = np.array([[ord(c) for c in pid]], np.uint16)
        cj["tumorMask"] = (image.T > image.mean()).astype(np.uint8)
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64".ljust(116) + b"\x00" * 8 + b"\x00\x02IM")


def test_brain_tumor_figshare(tmp_path):
    import h5py

    rng = np.random.default_rng(0)
    slices = []  # (N, label, pid)
    for n in range(1, 25):
        slices.append((n, (n - 1) % 3 + 1, f"10{(n - 1) // 2:04d}"))  # two slices per patient
    images = {}
    for n, label, pid in slices:
        folder = "brainTumorDataPublic_1-12" if n <= 12 else "brainTumorDataPublic_13-24"
        image = rng.integers(-200, 1800, (24, 20)).astype(np.int16)
        image[0, :5] = [-300, 0, 100, 2000, 7]  # a known corner, to see the transpose undone
        images[n] = image
        _mat(str(tmp_path / folder / f"{n}.mat"), image, label, pid)
    ds = data.get_dataset("brain_tumor_figshare", str(tmp_path), seed=4)
    assert ds.class_names == ["meningioma", "glioma", "pituitary"] and ds.channels == 1
    assert sum(map(len, ds.splits.values())) == 24
    _disjoint(ds)
    rec = {int(os.path.basename(r.path)[:-4]): r for r in _all(ds)}
    assert rec[5].label == 1 and rec[5].patient == "100002"
    # the loader sees the image as MATLAB shows it (rows x cols), min-max mapped to 0..255
    from medjax.data.transforms import decode

    pixels = np.asarray(decode(rec[7].path, 1)).astype(float)
    expected = (images[7] - images[7].min()) * 255.0 / (images[7].max() - images[7].min())
    assert pixels.shape == (24, 20) and np.abs(pixels - np.rint(expected)).max() <= 1
    # the authors' folds: test = fold 2; slices of a test patient in another fold are excluded
    folds = np.array([(n - 1) // 2 % 5 + 1 for n in range(1, 25)], float)
    folds[3] = 2  # slice 4 (patient 100001, whose slice 3 is fold 2) moved: same patient, other fold
    with h5py.File(tmp_path / "cvind.mat", "w") as f:
        f["cvind"] = folds[None, :]
    cv = data.get_dataset("brain_tumor_figshare", str(tmp_path), cv_fold=2)
    assert sorted(int(os.path.basename(r.path)[:-4]) for r in cv.splits["test"]) == [
        n for n in range(1, 25) if folds[n - 1] == 2]
    _disjoint(cv)
    _mat(str(tmp_path / "25.mat"), images[1], 4, "100099")
    with pytest.raises(DataError, match=r"25.mat: cjdata.label is \[4.0\]; expected 1 \(meningioma\)"):
        data.get_dataset("brain_tumor_figshare", str(tmp_path))
    (tmp_path / "25.mat").write_bytes(b"MATLAB 5.0 MAT-file" + b"\x00" * 200)
    with pytest.raises(DataError, match=r"25.mat: not a MATLAB v7.3 \(HDF5\) file"):
        data.get_dataset("brain_tumor_figshare", str(tmp_path))


# ------------------------------------------------------------------------------------------------ fake + describe

@pytest.mark.parametrize("name", NEW)
def test_fake_and_describe_every_new_dataset(name, tmp_path, capsys):
    root = str(tmp_path / name)
    assert data_cli(["fake", "--dataset", name, "--root", root, "--num", "30", "--size", "24", "--seed", "1"]) == 0
    capsys.readouterr()
    assert data_cli(["describe", "--dataset", name, "--root", root, "--workdir", str(tmp_path / "w")]) == 0
    out = json.loads(capsys.readouterr().out)
    ds = data.get_dataset(name, root)
    assert sum(s["images"] for s in out["splits"].values()) + len(ds.excluded) == 30
    assert list(out["splits"]) == ["train", "val", "test"]
    _disjoint(ds)
    saved = json.load(open(tmp_path / "w" / "splits" / f"{name}.json"))
    assert saved["dataset"] == name and saved["counts"] == {s: v["images"] for s, v in out["splits"].items()}
    again = data.get_dataset(name, root)
    assert [r.path for r in _all(again)] == [r.path for r in _all(ds)]  # deterministic
    batch = next(data.make_loader(ds, "train", batch_size=4, image_size=16, train=True, shard_index=0, shard_count=1))
    assert batch["image"].shape == (4, 16, 16, ds.channels) and batch["mask"].all()


def test_options_are_declared_in_one_place():
    assert set(NEW) <= set(data.OPTIONS)
    for name, options in data.OPTIONS.items():
        for option, (default, help_text) in options.items():
            assert isinstance(help_text, str) and help_text, (name, option)
        assert {"check_images", "skip_bad_images", "allow_outside_root", "seed"} <= set(options), name
    assert data.OPTIONS["chexpert"]["uncertain"][0] == "zeros"
    assert data.OPTIONS["nih_chestxray14"]["no_finding_class"][0] is False
    with pytest.raises(DataError, match="dataset 'ham10000' has no option 'classes'; its options: seed"):
        data.get_dataset("ham10000", "/nonexistent", classes=3)


def test_options_cli(capsys):
    assert data_cli(["options", "--dataset", "brain_tumor_figshare"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["brain_tumor_figshare"]["cv_fold"]["default"] is None
    assert out["brain_tumor_figshare"]["check_images"]["default"] == "verify"
