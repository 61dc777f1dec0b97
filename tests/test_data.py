"""medjax.data on synthetic data in each public layout: records and labels, splits, loaders, checkpointing, describe."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from medjax import data
from medjax.data import fake
from medjax.testing import run_cli

DATASETS = ["chexpert", "ddsm", "cbis_ddsm", "isic2019", "aptos2019", "csv", "folder"]
NUM = {"chexpert": 30, "ddsm": 30, "cbis_ddsm": 16, "isic2019": 30, "aptos2019": 30, "csv": 24, "folder": 24}
SEEDED = ["cbis_ddsm", "isic2019", "aptos2019", "csv", "folder"]  # splits drawn from the seed


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("fake")
    return {name: fake.write(name, str(base / name), NUM[name], seed=1, size=40)["root"] for name in DATASETS}


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _all(ds):
    return [r for recs in ds.splits.values() for r in recs]


# ------------------------------------------------------------------------------------------------ hand-written rows

def _png(path, mode="L", size=(12, 10), value=100):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, value if mode != "RGB" else (value, value, value)).save(path)


def test_chexpert_label_policies_by_hand(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *data.chexpert.CLASS_NAMES]
    #           NoF  EnlC Card LOp  LLes Edem Cons Pneu Atel Pnx  PlEf PlOt Frac SupD
    cells = [["", "", "1.0", "-1.0", "", "", "", "", "", "", "0.0", "", "", ""],  # Cardiomegaly +, LOp uncertain
             ["", "", "", "-1.0", "", "", "", "", "", "", "", "", "", ""],  # only uncertain
             ["1.0", "", "", "", "", "", "", "", "", "", "", "", "", ""],  # No Finding
             ["", "0.0", "", "", "", "", "", "", "", "", "", "", "", "1.0"]]  # Support Devices
    views = ["Frontal", "Lateral", "Frontal", "Frontal"]
    rows = []
    for i, (c, view) in enumerate(zip(cells, views)):
        rel = f"train/patient{i + 1:05d}/study1/view1_{view.lower()}.jpg"
        _png(str(root / rel))
        rows.append([f"CheXpert-v1.0-small/{rel}", "Male", 50, view, "AP", *c])
    with open(root / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])

    def labels(**kw):
        ds = data.get_dataset("chexpert", str(root), val_fraction=0.0, test_fraction=0.0, **kw)
        return [r.label for r in ds.splits["train"]]

    hot = lambda *idx: tuple(int(i in idx) for i in range(14))  # noqa: E731
    assert labels() == [hot(2), hot(0), hot(0), hot(13)]  # U-Zeroes; no positive -> No Finding
    assert labels(uncertain="ones") == [hot(2, 3), hot(3), hot(0), hot(13)]
    assert labels(frontal_only=True) == [hot(2), hot(0), hot(13)]
    ds = data.get_dataset("chexpert", str(root), val_fraction=0.0, test_fraction=0.0)
    assert [r.patient for r in ds.splits["train"]] == ["patient00001", "patient00002", "patient00003", "patient00004"]
    assert ds.splits["train"][0].path == str(root / "train/patient00001/study1/view1_frontal.jpg")


def test_ddsm_labels_by_hand(tmp_path):
    names = {"train": ["normal_A_0001_1.LEFT_CC.png", "benign_B_0002_1.RIGHT_MLO.png"],
             "val": ["cancer_C_0003_1.LEFT_CC.png"], "test": ["cancer_D_0004_1.LEFT_MLO.png"]}
    for split, files in names.items():
        os.makedirs(tmp_path / "ddsm_raw_image_lists", exist_ok=True)
        (tmp_path / "ddsm_raw_image_lists" / f"{split}.txt").write_text("\n".join(files) + "\n\n")
        for f in files:
            _png(str(tmp_path / "ddsm_raw" / f))
    two = data.get_dataset("ddsm", str(tmp_path))
    assert {s: [r.label for r in recs] for s, recs in two.splits.items()} == {"train": [0, 1], "val": [1], "test": [1]}
    assert two.class_names == ["normal", "benign_or_cancer"] and two.channels == 1
    three = data.get_dataset("ddsm", str(tmp_path), num_classes=3)
    assert [r.label for r in _all(three)] == [0, 1, 2, 2]
    assert [r.patient for r in _all(three)] == ["A_0001", "B_0002", "C_0003", "D_0004"]
    assert three.splits["val"][0].origin.endswith("val.txt line 1")


def test_isic_and_aptos_labels_by_hand(tmp_path):
    isic = tmp_path / "isic"
    classes = data.isic2019.CLASS_NAMES
    rows = [["ISIC_0000000"] + ["1.0" if c == "BCC" else "0.0" for c in classes] + ["0.0"],
            ["ISIC_0000001"] + ["1.0" if c == "SCC" else "0.0" for c in classes] + ["0.0"],
            ["ISIC_0000002"] + ["1.0" if c == "MEL" else "0.0" for c in classes] + ["0.0"]]
    os.makedirs(isic)
    with open(isic / "ISIC_2019_Training_GroundTruth.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", *classes, "UNK"], *rows])
    for r in rows:
        _png(str(isic / "ISIC_2019_Training_Input" / "ISIC_2019_Training_Input" / f"{r[0]}.jpg"), "RGB")
    ds = data.get_dataset("isic2019", str(isic), val_fraction=0.0, test_fraction=0.0)
    assert sorted((os.path.basename(r.path), r.label) for r in _all(ds)) == [
        ("ISIC_0000000.jpg", 2), ("ISIC_0000001.jpg", 7), ("ISIC_0000002.jpg", 0)]
    assert ds.task == "multiclass" and ds.channels == 3 and ds.target_metric == "balanced_accuracy"

    aptos = tmp_path / "aptos"
    os.makedirs(aptos)
    (aptos / "train_1.csv").write_text("id_code,diagnosis\n000c1434d8d7,2\n001639a390f0,4\n0024cdab0c1e,0\n")
    for code in ("000c1434d8d7", "001639a390f0", "0024cdab0c1e"):
        _png(str(aptos / "train_images" / "train_images" / f"{code}.png"), "RGB")
    ds = data.get_dataset("aptos2019", str(aptos), val_fraction=0.0, test_fraction=0.0)
    assert sorted((os.path.basename(r.path), r.label) for r in _all(ds)) == [
        ("000c1434d8d7.png", 2), ("001639a390f0.png", 4), ("0024cdab0c1e.png", 0)]
    assert ds.class_names[4] == "Proliferative DR" and ds.target_metric == "quadratic_kappa"


def test_cbis_ddsm_by_hand(tmp_path):
    cols = data.cbis_ddsm.COLUMNS
    tree = tmp_path / "CBIS-DDSM"

    def dicom(series, value=120.0):
        fake.save_dicom(np.full((10, 8, 1), value), str(tree / series / "07-20-2016-DDSM-1" / "1.000-full-1" /
                                                        "1-1.dcm"))
        fake.save_dicom(np.zeros((4, 4, 1)), str(tree / f"{series}_1" / "x" / "ROI-1" / "1-1.dcm"))
        return f"{series}/1.3.6.1/1.3.6.2/000000.dcm"

    train = [["P_00001", "LEFT", "CC", "BENIGN", dicom("Mass-Training_P_00001_LEFT_CC")],
             ["P_00001", "LEFT", "CC", "MALIGNANT", dicom("Mass-Training_P_00001_LEFT_CC")],  # 2nd abnormality
             ["P_00002", "RIGHT", "MLO", "BENIGN_WITHOUT_CALLBACK", dicom("Mass-Training_P_00002_RIGHT_MLO")],
             ["P_00003", "LEFT", "MLO", "BENIGN", dicom("Mass-Training_P_00003_LEFT_MLO")]]
    test = [["P_00003", "RIGHT", "CC", "MALIGNANT", dicom("Mass-Test_P_00003_RIGHT_CC")]]
    for kind in ("mass", "calc"):
        for split, rows in (("train", train), ("test", test)):
            with open(tmp_path / data.cbis_ddsm.CSV_FILES[kind, split], "w", newline="") as f:
                csv.writer(f).writerows([cols, *(rows if kind == "mass" else [])])
    ds = data.get_dataset("cbis_ddsm", str(tmp_path), val_fraction=0.0)
    got = {s: sorted((r.patient, r.label) for r in recs) for s, recs in ds.splits.items()}
    assert got == {"train": [("P_00001", 1), ("P_00002", 0)], "test": [("P_00003", 1)]}
    assert [e[2] for e in ds.excluded] == ["patient P_00003 is also in the official test set"]
    assert all(r.path.endswith("1-1.dcm") and "_1" not in os.path.basename(os.path.dirname(os.path.dirname(
        os.path.dirname(r.path)))) for r in _all(ds))


# ------------------------------------------------------------------------------------------------ fake layouts

def test_fake_cli_writes_public_layout(tmp_path):
    out = json.loads(run_cli("medjax.data", "fake", "--dataset", "aptos2019", "--root", str(tmp_path),
                             "--num", "6", "--size", "24").stdout)
    assert out["images"] == 6
    rows = _rows(tmp_path / "train_1.csv")
    assert list(rows[0]) == ["id_code", "diagnosis"] and len(rows) == 6
    img = Image.open(tmp_path / "train_images" / "train_images" / f"{rows[0]['id_code']}.png")
    assert img.mode == "RGB" and img.size == (24, 24)


def test_fake_image_modes(roots):
    chex = _rows(os.path.join(roots["chexpert"], "train.csv"))[0]["Path"]
    assert chex.startswith("CheXpert-v1.0-small/train/patient00001/")
    assert Image.open(os.path.join(roots["chexpert"], chex.split("/", 1)[1])).mode == "L"
    ddsm_name = open(os.path.join(roots["ddsm"], "ddsm_raw_image_lists", "train.txt")).readline().strip()
    assert Image.open(os.path.join(roots["ddsm"], "ddsm_raw", ddsm_name)).mode == "I;16"
    isic = _rows(os.path.join(roots["isic2019"], "ISIC_2019_Training_GroundTruth.csv"))[0]["image"]
    assert Image.open(os.path.join(roots["isic2019"], "ISIC_2019_Training_Input", "ISIC_2019_Training_Input",
                                   isic + ".jpg")).format == "JPEG"
    import pydicom

    ds = data.get_dataset("cbis_ddsm", roots["cbis_ddsm"])
    dcm = pydicom.dcmread(ds.splits["train"][0].path)
    assert dcm.BitsAllocated == 16 and dcm.PhotometricInterpretation == "MONOCHROME2"


def _expected_labels(name, root):
    """Labels recomputed from the files `fake` wrote, independently of the readers: {file name: label}."""
    if name == "chexpert":
        out = {}
        for row in _rows(os.path.join(root, "train.csv")):
            hot = [int(row[c] == "1.0") for c in data.chexpert.CLASS_NAMES]
            hot[0] = hot[0] or int(not any(hot))
            out[row["Path"].split("/", 1)[1]] = tuple(hot)
        return out
    if name == "ddsm":
        names = [n.strip() for s in ("train", "val", "test")
                 for n in open(os.path.join(root, "ddsm_raw_image_lists", f"{s}.txt")) if n.strip()]
        return {n: int(not n.startswith("normal")) for n in names}
    if name == "isic2019":
        return {r["image"] + ".jpg": [float(r[c]) for c in data.isic2019.CLASS_NAMES].index(1.0)
                for r in _rows(os.path.join(root, "ISIC_2019_Training_GroundTruth.csv"))}
    if name == "aptos2019":
        return {r["id_code"] + ".png": int(r["diagnosis"]) for r in _rows(os.path.join(root, "train_1.csv"))}
    if name == "csv":
        return {r["image"]: fake.GENERIC_CLASSES.index(r["label"]) for r in _rows(os.path.join(root, "labels.csv"))}
    if name == "folder":
        return {f"{c}/{f}": k for k, c in enumerate(fake.GENERIC_CLASSES) for f in os.listdir(os.path.join(root, c))}
    if name == "cbis_ddsm":
        out = {}
        for (kind, split), f in data.cbis_ddsm.CSV_FILES.items():
            for r in _rows(os.path.join(root, f)):
                key = (split, r["patient_id"], r["left or right breast"], r["image view"])
                out[key] = max(out.get(key, 0), int(r["pathology"] == "MALIGNANT"))
        return out


@pytest.mark.parametrize("name", DATASETS)
def test_records_and_labels_match_the_files(name, roots):
    ds = data.get_dataset(name, roots[name])
    expected = _expected_labels(name, roots[name])
    records = _all(ds)
    assert len(records) + len(ds.excluded) == len(expected) == NUM[name]
    for r in records:
        if name == "cbis_ddsm":
            split = "test" if "-Test_" in r.path else "train"
            side, view = r.path.split(os.sep + "CBIS-DDSM" + os.sep)[1].split(os.sep)[0].split("_")[-2:]
            key = (split, r.patient, side, view)
        else:
            key = os.path.relpath(r.path, roots[name] if name not in ("ddsm", "isic2019", "aptos2019") else
                                  os.path.dirname(r.path)).replace(os.sep, "/")
        assert r.label == expected[key], (r, expected[key])
    assert len(ds.class_names) == (14, 2, 2, 8, 5, 3, 3)[DATASETS.index(name)]


# ------------------------------------------------------------------------------------------------ splits

@pytest.mark.parametrize("name", DATASETS)
def test_splits_disjoint_deterministic_and_written(name, roots, tmp_path):
    a = data.get_dataset(name, roots[name], workdir=str(tmp_path), seed=3)
    b = data.get_dataset(name, roots[name], seed=3)
    assert a.splits == b.splits
    assert set(a.splits) == {"train", "val", "test"}
    owner = {}
    for split, records in a.splits.items():
        for r in records:
            for key in (r.path, r.patient):
                if key is not None:
                    assert owner.setdefault(key, split) == split, f"{key} in {owner[key]} and {split}"
    if name in SEEDED:
        other = data.get_dataset(name, roots[name], seed=4)
        assert other.splits != a.splits
        assert sorted(r.path for r in _all(other)) == sorted(r.path for r in _all(a))
    saved = json.load(open(a.split_file))
    assert a.split_file == os.path.join(str(tmp_path), "splits", f"{name}.json")
    assert {s: [os.path.join(roots[name], e[0]) for e in v] for s, v in saved["splits"].items()} == \
        {s: [r.path for r in recs] for s, recs in a.splits.items()}
    assert saved["options"]["seed"] == 3 and saved["class_names"] == a.class_names


def test_split_fractions_and_reference_rules(roots):
    aptos = data.get_dataset("aptos2019", roots["aptos2019"])  # 70/15/15 of 30
    assert {s: len(r) for s, r in aptos.splits.items()} == {"train": 20, "val": 5, "test": 5}  # val, test >= 4.5
    isic = data.get_dataset("isic2019", roots["isic2019"])  # 80/10/10, whole lesions
    assert len(isic.splits["val"]) >= 3 and len(isic.splits["test"]) >= 3
    lesion = {r["image"]: r["lesion_id"] for r in _rows(os.path.join(roots["isic2019"],
                                                                     "ISIC_2019_Training_Metadata.csv"))}
    where = {}
    for split, recs in isic.splits.items():
        for r in recs:
            lid = lesion[os.path.basename(r.path)[:-4]]
            if lid:
                assert where.setdefault(lid, split) == split
    # CheXpert: patients in path order; val first (>= 10% of images), then test
    chex = data.get_dataset("chexpert", roots["chexpert"], seed=9)
    ids = lambda s: sorted({r.patient for r in chex.splits[s]})  # noqa: E731
    assert max(ids("val")) < min(ids("test")) and max(ids("test")) < min(ids("train"))
    assert ids("val")[0] == "patient00001" and len(chex.splits["val"]) >= 3
    assert data.get_dataset("chexpert", roots["chexpert"], seed=1).splits == chex.splits  # seed-free reference rule
    shuffled = data.get_dataset("chexpert", roots["chexpert"], shuffle_patients=True, seed=9)
    assert shuffled.splits != chex.splits
    valid = data.get_dataset("chexpert", roots["chexpert"], use_valid_as_test=True)
    assert all("/valid/" in r.path for r in valid.splits["test"]) and len(valid.splits["test"]) == NUM["chexpert"] // 8
    assert "/valid/" not in "".join(r.path for r in valid.splits["train"] + valid.splits["val"])


# ------------------------------------------------------------------------------------------------ loaders

def _batches(it, n):
    return [next(it) for _ in range(n)]


def _equal(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in ("image", "label", "mask"))


@pytest.mark.parametrize("name", ["chexpert", "ddsm", "cbis_ddsm", "isic2019", "aptos2019"])
def test_loader_batches(name, roots):
    ds = data.get_dataset(name, roots[name])
    it = data.make_loader(ds, "train", batch_size=4, image_size=16, train=True, seed=0, shard_index=0, shard_count=1)
    batch = next(it)
    assert set(batch) == {"image", "label", "mask"}
    assert batch["image"].shape == (4, 16, 16, ds.channels) and batch["image"].dtype == np.float32
    if ds.task == "multilabel":
        assert batch["label"].shape == (4, 14) and batch["label"].dtype == np.float32
    else:
        assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
    assert batch["mask"].dtype == np.bool_ and batch["mask"].all()
    assert np.isfinite(batch["image"]).all() and batch["image"].std() > 0.1


def test_eval_loader_keeps_order_and_pads(roots):
    ds = data.get_dataset("aptos2019", roots["aptos2019"])
    records = ds.splits["train"]  # 20 or 21 records, batch 8 -> last batch padded
    batches = list(data.make_loader(ds, "train", batch_size=8, image_size=16, train=False, shard_index=0,
                                    shard_count=1))
    assert len(batches) == -(-len(records) // 8) == data.num_batches(ds, "train", 8, train=False, shard_count=1)
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == len(records) and mask[:len(records)].all()
    assert np.concatenate([b["label"] for b in batches])[mask].tolist() == [r.label for r in records]
    # two processes: contiguous blocks, same batch count, concatenated in process order = the split in order
    shards = [list(data.make_loader(ds, "train", batch_size=4, image_size=16, train=False, shard_index=k,
                                    shard_count=2)) for k in range(2)]
    assert len(shards[0]) == len(shards[1])
    labels = np.concatenate([b["label"][b["mask"]] for s in shards for b in s])
    assert labels.tolist() == [r.label for r in records]
    images = np.concatenate([b["image"][b["mask"]] for s in shards for b in s])
    np.testing.assert_array_equal(images, np.concatenate([b["image"] for b in batches])[mask])


def test_train_loader_epochs_shards_and_determinism(roots):
    ds = data.get_dataset("aptos2019", roots["aptos2019"])
    n = len(ds.splits["train"])
    kw = dict(batch_size=4, image_size=16, train=True, shard_index=0, shard_count=1)
    steps = n // 4
    assert data.num_batches(ds, "train", 4, train=True, shard_count=1) == steps
    a = _batches(data.make_loader(ds, "train", seed=5, **kw), 2 * steps + 1)
    b = _batches(data.make_loader(ds, "train", seed=5, **kw), 2 * steps + 1)
    assert _equal(a, b)  # same seed: same order and the same augmented pixels
    c = _batches(data.make_loader(ds, "train", seed=6, **kw), 2)
    assert not np.array_equal(a[0]["image"], c[0]["image"])
    # num_epochs=1: one epoch of full batches, the incomplete rest dropped
    one = list(data.make_loader(ds, "train", seed=5, num_epochs=1, **kw))
    assert len(one) == steps and _equal(one, a[:steps])
    # epochs are reshuffled: the epoch 1 image set differs from epoch 0 in order (labels as a proxy)
    e0 = np.concatenate([x["label"] for x in a[:steps]])
    e1 = np.concatenate([x["label"] for x in a[steps:2 * steps]])
    assert not np.array_equal(e0, e1)
    # two processes: the same number of batches, disjoint records within an epoch
    kw2 = dict(kw, shard_count=2)
    per = (n // 2) // 4
    s0 = _batches(data.make_loader(ds, "train", seed=5, **kw2), per)
    s1 = _batches(data.make_loader(ds, "train", seed=5, **{**kw2, "shard_index": 1}), per)
    flat = lambda bs: {x.tobytes() for b in bs for x in b["image"]}  # noqa: E731
    assert not flat(s0) & flat(s1)
    # a record's augmentation depends on (seed, epoch, record), not on the process count or the batch size
    assert flat(s0) | flat(s1) <= flat(a[:steps])
    halves = _batches(data.make_loader(ds, "train", seed=5, **dict(kw, batch_size=2)), n // 2)
    assert flat(halves) == flat(a[:steps]) and n % 4 == 0


def test_iterator_checkpoint_restore(roots):
    ds = data.get_dataset("chexpert", roots["chexpert"])
    kw = dict(batch_size=4, image_size=16, train=True, seed=2, shard_index=0, shard_count=1)
    steps = data.num_batches(ds, "train", 4, train=True, shard_count=1)
    it = data.make_loader(ds, "train", **kw)
    _batches(it, steps - 1)  # mid-epoch ...
    state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable, as grain.checkpoint stores it
    expected = _batches(it, 3)  # ... continuing across the epoch boundary
    restored = data.make_loader(ds, "train", **kw)
    restored.set_state(state)
    assert _equal(_batches(restored, 3), expected)
    ev = data.make_loader(ds, "val", batch_size=2, image_size=16, train=False, shard_index=0, shard_count=1)
    next(ev)
    state = ev.get_state()
    rest = list(ev)
    ev2 = data.make_loader(ds, "val", batch_size=2, image_size=16, train=False, shard_index=0, shard_count=1)
    ev2.set_state(state)
    assert _equal(list(ev2), rest)


def test_normalization_options(roots):
    ds = data.get_dataset("aptos2019", roots["aptos2019"])
    kw = dict(batch_size=2, image_size=16, train=False, shard_index=0, shard_count=1)
    raw = next(data.make_loader(ds, "val", normalization=((0, 0, 0), (1, 1, 1)), **kw))["image"]
    assert raw.min() >= 0 and raw.max() <= 1
    for norm, (mean, std) in (("dataset", (ds.mean, ds.std)), ("imagenet", ((0.485, 0.456, 0.406),
                                                                              (0.229, 0.224, 0.225)))):
        got = next(data.make_loader(ds, "val", normalization=norm, **kw))["image"]
        np.testing.assert_allclose(got, (raw - np.array(mean)) / np.array(std), atol=1e-5)
    gray = data.get_dataset("ddsm", roots["ddsm"])
    assert data.pipeline.normalization_stats(gray, "imagenet") == ((0.485,), (0.229,))


# ------------------------------------------------------------------------------------------------ describe

def test_describe_cli_json(roots):
    out = json.loads(run_cli("medjax.data", "describe", "--dataset", "chexpert", "--root", roots["chexpert"]).stdout)
    assert list(out) == ["dataset", "splits"] and out["dataset"] == "chexpert"
    assert list(out["splits"]) == ["train", "val", "test"]
    ds = data.get_dataset("chexpert", roots["chexpert"])
    for split, info in out["splits"].items():
        assert set(info) == {"images", "labels", "patients"}
        assert info["images"] == len(ds.splits[split])
        assert list(info["labels"]) == data.chexpert.CLASS_NAMES
        assert info["labels"]["Cardiomegaly"] == sum(r.label[2] for r in ds.splits[split])  # positives per class
        assert info["patients"] == len({r.patient for r in ds.splits[split]})
    aptos = data.describe(data.get_dataset("aptos2019", roots["aptos2019"]))
    assert aptos["splits"]["train"]["patients"] is None
    assert sum(aptos["splits"]["train"]["labels"].values()) == aptos["splits"]["train"]["images"]
    opt = run_cli("medjax.data", "describe", "--dataset", "chexpert", "--root", roots["chexpert"],
                  "--option", "uncertain=ones", "--option", "frontal_only=true")
    assert json.loads(opt.stdout)["splits"]["train"]["images"] < out["splits"]["train"]["images"]
