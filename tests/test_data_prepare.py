"""Prepared datasets (issue 16): `python -m medjax.data prepare` writes a TFDS ArrayRecord dataset that the loader reads
through tfds.data_source with the raw pipeline's splits, order, augmentation and resume; a killed prepare restarts to
the same records; no TensorFlow; bad input is one error line; JPEG draft decoding and `bench`. Issue 24: images stored
at the loader's resize as raw uint8 arrays give the raw files' batches bit for bit; an older format is refused."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from medjax import data
from medjax.data import fake, prepare, prepared, transforms
from medjax.testing import ROOT, run_cli

SMALL = {"chexpert": 30, "cbis_ddsm": 16, "aptos2019": 30}  # multi-label JPEG, 16-bit DICOM, RGB PNG
FORMAT = {"chexpert": "png", "cbis_ddsm": "raw", "aptos2019": "raw"}  # stored as: PNG, raw grayscale, raw RGB
UNIT = ((0, 0, 0), (1, 1, 1))


def _prepare(name, raw, out, **kw):
    return prepare.prepare(name, raw, out, progress=False, **kw)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    base = tmp_path_factory.mktemp("prepare")
    out = {}
    for name, num in SMALL.items():
        raw = fake.write(name, str(base / name), num, seed=1, size=40)["root"]
        out[name] = (raw, _prepare(name, raw, str(base / f"{name}_prepared"), image_format=FORMAT[name])["output"])
    return out


def read_back_digest(root):
    """The records' digest computed from the ArrayRecord files through TFDS (not from what prepare recorded)."""
    meta = prepared.read_metadata(root)
    builder = os.path.join(root, meta["tfds"]["builder_dir"])
    parts = []
    for split, rows in meta["splits"].items():
        source = prepared.open_split(builder, split)
        assert len(source) == len(rows)
        for i in range(len(source)):
            ex = source[i]
            label = [int(v) for v in ex["label"]] if meta["task"] == "multilabel" else int(ex["label"])
            parts.append(prepared.record_digest(split, i, ex["image"], label, ex["patient"].decode(),
                                                ex["path"].decode()))
    return hashlib.sha256(b"".join(parts)).hexdigest()


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in ("image", "label", "mask"):
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ------------------------------------------------------------------------------------------------ parity with raw

@pytest.mark.parametrize("name", sorted(SMALL))
def test_prepared_and_raw_give_identical_datasets_and_batches(name, small):
    raw_root, prep_root = small[name]
    raw, pre = data.get_dataset(name, raw_root), data.get_dataset(name, prep_root)
    assert pre.prepared is not None and raw.prepared is None
    assert data.describe(pre) == data.describe(raw)
    for split in raw.splits:
        assert [(raw.relative(r.path), r.label, r.patient, r.origin) for r in raw.splits[split]] == \
               [(pre.relative(r.path), r.label, r.patient, r.origin) for r in pre.splits[split]]
    assert (pre.mean, pre.std, pre.class_names, pre.task, pre.channels) == \
           (raw.mean, raw.std, raw.class_names, raw.task, raw.channels)
    assert [(raw.relative(p), o, w) for p, o, w in raw.excluded] == \
           [(pre.relative(p), o, w) for p, o, w in pre.excluded]
    # the images are small (<= --max-size): stored pixel for pixel, so batches are bit-identical; two shards, across
    # an epoch boundary, then an eval pass with padding
    kw = dict(batch_size=3, image_size=32, shard_count=2)
    steps = data.num_batches(raw, "train", 3, train=True, shard_count=2) + 2
    for shard in (0, 1):
        _assert_same(_take(data.make_loader(pre, "train", train=True, seed=5, shard_index=shard, **kw), steps),
                     _take(data.make_loader(raw, "train", train=True, seed=5, shard_index=shard, **kw), steps))
    split = "val" if "val" in raw.splits else "test"
    ev = dict(batch_size=4, image_size=32, train=False, shard_index=0, shard_count=1)
    _assert_same(list(data.make_loader(pre, split, **ev)), list(data.make_loader(raw, split, **ev)))
    # a TFDS dataset in its own right: record i of each TFDS split is record i of the medjax split
    meta = prepared.read_metadata(prep_root)
    for split, records in pre.splits.items():
        source = pre.prepared.source(split)
        assert [source[i]["path"].decode() for i in range(len(source))] == [pre.relative(r.path) for r in records]
        assert [source[i]["patient"].decode() or None for i in range(len(source))] == [r.patient for r in records]
    assert read_back_digest(prep_root) == meta["digest"]


def _batches(ds, train, n, **kw):
    return _take(data.make_loader(ds, "train", batch_size=4, train=train, seed=1, shard_index=0, shard_count=1,
                                  normalization=UNIT, **kw), n)


@pytest.mark.parametrize("resize, stored", [("square", (256, 256)), ("shorter", (341, 256))])
def test_larger_images_are_stored_at_the_loader_resize_and_give_the_raw_batches(resize, stored, tmp_path):
    """800 x 600 JPEGs prepared for 224 px: stored as the loader's resize (256 x 256, or shorter side 256: 341 x 256,
    torchvision's int(256 * 800 / 600)) in raw uint8, and every train and eval batch equals the one the raw pipeline
    (full JPEG decode, Pillow's resize) makes from the original files, bit for bit."""
    raw_root = fake.write("isic2019", str(tmp_path / "raw"), 12, seed=2, size=800)["root"]  # 800 x 600 JPEGs
    summary = _prepare("isic2019", raw_root, str(tmp_path / "prepared"), resize=resize)
    meta = prepared.read_metadata(summary["output"])
    assert (meta["version"], meta["image"]["format"], meta["image"]["resize"]) == (2, "raw", resize)
    assert {tuple(row[4]) for rows in meta["splits"].values() for row in rows} == {stored}
    assert {tuple(row[5]) for rows in meta["splits"].values() for row in rows} == {(800, 600)}
    pre = data.get_dataset("isic2019", summary["output"])
    record = pre.splits["train"][0]
    stored_bytes = pre.prepared.example(record)["image"]
    assert len(stored_bytes) == stored[0] * stored[1] * 3  # the pixels themselves, no image format
    reference = transforms.decode(os.path.join(raw_root, pre.relative(record.path)), 3)
    reference = reference.resize(transforms.resize_output_size(800, 600, 256, resize), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(np.frombuffer(stored_bytes, np.uint8).reshape(256, stored[0], 3),
                                  np.asarray(reference))
    raw = data.get_dataset("isic2019", raw_root, jpeg_draft=False)  # the full decode, as prepare does
    for train in (True, False):
        _assert_same(_batches(pre, train, 2, image_size=224, resize=resize),
                     _batches(raw, train, 2, image_size=224, resize=resize))


def test_another_image_size_is_resized_again_within_a_grey_level_and_another_resize_is_refused(small, tmp_path,
                                                                                                 caplog):
    raw_root = fake.write("aptos2019", str(tmp_path / "raw"), 12, seed=4, size=300)["root"]  # 300 x 300 PNGs
    pre = data.get_dataset("aptos2019", _prepare("aptos2019", raw_root, str(tmp_path / "p"))["output"])
    raw = data.get_dataset("aptos2019", raw_root)
    with caplog.at_level("WARNING"):
        a = _batches(pre, False, 2, image_size=160)  # resizes 256 -> 183: not the raw pipeline's 300 -> 183
    assert "prepared for a 256 px resize; image_size 160 resizes to 183" in caplog.text
    diff = np.abs(np.concatenate([x["image"] for x in a]) -
                  np.concatenate([x["image"] for x in _batches(raw, False, 2, image_size=160)])) * 255
    assert 0 < diff.mean() < 1.0, diff.mean()  # a second resampling: docs/data.md, "Prepared datasets"
    with pytest.raises(data.DataError, match=r"prepared for resize='square'; this run asks for resize='shorter': "
                                             r"prepare again with --resize shorter"):
        data.make_loader(pre, "train", batch_size=4, train=True, resize="shorter", shard_index=0, shard_count=1)


def test_stored_size_is_the_loader_resize_unless_the_image_is_smaller():
    assert prepare.stored_size(3216, 2136, 256) == (256, 256)
    assert prepare.stored_size(3216, 2136, 256, "shorter") == (385, 256)  # int(256 * 3216 / 2136) = int(385.4)
    assert prepare.stored_size(2136, 3216, 256, "shorter") == (256, 385)
    assert prepare.stored_size(300, 200, 256) == (300, 200)  # 60,000 pixels < 256 x 256: kept as decoded
    assert prepare.stored_size(300, 200, 256, "shorter") == (300, 200)  # the resize would upsample to 384 x 256
    assert prepare.stored_size(1000, 100, 256) == (256, 256)  # fewer pixels, though one side grows


def test_a_raw_record_of_the_wrong_length_is_refused_not_reshaped():
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)  # height 2, width 3, RGB
    np.testing.assert_array_equal(np.asarray(prepared.raw_image(pixels.tobytes(), 3, 2, 3)), pixels)
    np.testing.assert_array_equal(np.asarray(prepared.raw_image(pixels[..., 0].tobytes(), 3, 2, 1)), pixels[..., 0])
    with pytest.raises(ValueError, match=r"holds 17 bytes, 3 x 2 x 3 = 18 expected; prepare the dataset again"):
        prepared.raw_image(pixels.tobytes()[:-1], 3, 2, 3)


def test_an_older_prepared_folder_is_refused_with_one_line(small, tmp_path):
    root = str(tmp_path / "v1")
    shutil.copytree(small["aptos2019"][1], root)
    meta_path = os.path.join(root, prepared.METADATA)
    meta = json.load(open(meta_path))
    meta["version"] = 1
    meta[prepared.DIGEST_KEY] = prepared.metadata_digest(meta)
    json.dump(meta, open(meta_path, "w"))
    line = _error_line(run_cli("medjax.data", "bench", "--dataset", "aptos2019", "--root", root, check=False))
    assert line == (f"error: {meta_path}: prepared dataset format version 1; this medjax reads version 2 (images "
                    "stored at the training size, read without decoding): prepare the dataset again (python -m "
                    "medjax.data prepare) into a new --output")


_RESUME = r"""
import json, os, signal, sys
import numpy as np
from medjax import data
root, out = sys.argv[1], sys.argv[2]
ds = data.get_dataset("aptos2019", root)
it = data.make_loader(ds, "train", batch_size=4, image_size=32, train=True, seed=7, shard_index=0, shard_count=1)
for step in range(100):
    batch = next(it)
    np.savez(os.path.join(out, f"batch{step}.npz"), **batch)
    with open(os.path.join(out, "state.tmp"), "w") as f:
        json.dump(it.get_state(), f)
    os.replace(os.path.join(out, "state.tmp"), os.path.join(out, "state.json"))
    if step == 5:
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sigkill_and_resume_on_a_prepared_dataset_continue_the_raw_stream(small, tmp_path):
    raw_root, prep_root = small["aptos2019"]
    proc = subprocess.run([sys.executable, "-c", _RESUME, prep_root, str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    kw = dict(batch_size=4, image_size=32, train=True, seed=7, shard_index=0, shard_count=1)
    expected = _take(data.make_loader(data.get_dataset("aptos2019", raw_root), "train", **kw), 12)  # crosses an epoch
    before = [dict(np.load(tmp_path / f"batch{i}.npz")) for i in range(6)]
    _assert_same(before, expected[:6])
    resumed = data.make_loader(data.get_dataset("aptos2019", prep_root), "train", **kw)
    resumed.set_state(json.loads((tmp_path / "state.json").read_text()))
    _assert_same(_take(resumed, 6), expected[6:])


# ------------------------------------------------------------------------------------------------ killed prepare

_KILLED = r"""
import sys
from medjax.data import prepare
prepare.prepare("aptos2019", sys.argv[1], sys.argv[2], chunk_size=4, workers=1, progress=False)
"""


@pytest.mark.parametrize("kill_at", ["chunk:3", "example:9", "metadata"])
def test_a_killed_prepare_restarts_to_the_same_dataset(kill_at, small, tmp_path, monkeypatch):
    raw_root, clean_root = small["aptos2019"]
    out = str(tmp_path / "prepared")
    env = dict(os.environ, **{prepare.KILL_ENV: kill_at})
    proc = subprocess.run([sys.executable, "-c", _KILLED, raw_root, out], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not prepared.is_prepared(out)  # a killed prepare never looks complete
    with pytest.raises(data.DataError):
        data.get_dataset("aptos2019", out)
    chunks = os.listdir(os.path.join(out, prepare.PARTIAL, "chunks"))
    assert len(chunks) == (3 if kill_at == "chunk:3" else 8)  # 30 images in chunks of 4
    converted = []
    real = prepare.convert_chunk
    monkeypatch.setattr(prepare, "convert_chunk", lambda *a: converted.append(a[0]) or real(*a))
    summary = _prepare("aptos2019", raw_root, out, chunk_size=4, workers=1)
    assert len(converted) == (5 if kill_at == "chunk:3" else 0)  # only the missing chunks are converted again
    clean = prepared.read_metadata(clean_root)
    assert summary["written"] and summary["digest"] == clean["digest"] == read_back_digest(out)
    assert prepared.read_metadata(out)["splits"] == clean["splits"]
    assert sorted(os.listdir(out)) == [prepared.BUILDER_NAME, prepared.METADATA]


def test_worker_processes_write_the_same_dataset(small, tmp_path):
    raw_root, clean_root = small["aptos2019"]
    summary = _prepare("aptos2019", raw_root, str(tmp_path / "p"), chunk_size=8, workers=2)
    assert summary["digest"] == prepared.read_metadata(clean_root)["digest"]
    again = _prepare("aptos2019", raw_root, str(tmp_path / "p"), workers=2)  # already there: nothing to do
    assert not again["written"] and again["digest"] == summary["digest"]


_NO_TF = r"""
import json, sys
from medjax import data
ds = data.get_dataset("chexpert", sys.argv[1], check_images="decode")
next(data.make_loader(ds, "train", batch_size=2, image_size=16, train=True, shard_index=0, shard_count=1))
tf = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
print(json.dumps({"prepared": ds.prepared is not None, "tfds": "tensorflow_datasets" in sys.modules, "tf": tf}))
"""


def test_reading_a_prepared_dataset_imports_no_tensorflow(small):
    proc = subprocess.run([sys.executable, "-c", _NO_TF, small["chexpert"][1]], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"prepared": True, "tfds": True, "tf": []}


# ------------------------------------------------------------------------------------------------ the trainer's call

def test_the_trainer_call_reads_a_prepared_root(small, tmp_path):
    from medjax import schema

    raw_root, prep_root = small["chexpert"]
    config = schema.make({"dataset": "chexpert", "data_root": prep_root, "data_options.check_images": "verify"})
    ds = data.get_dataset(config.dataset, config.data_root, workdir=str(tmp_path), seed=config.seed,
                          **schema.data_options(config))  # medjax/train.py's call
    raw = data.get_dataset("chexpert", raw_root, workdir=str(tmp_path / "raw"), seed=config.seed)
    assert ds.prepared is not None and data.describe(ds) == data.describe(raw)
    split_file = json.load(open(ds.split_file))
    raw_split_file = json.load(open(raw.split_file))
    assert split_file["splits"] == raw_split_file["splits"] and split_file["root"] == prep_root


# ------------------------------------------------------------------------------------------------ bad input

def test_reading_with_other_options_or_another_name_is_refused(small):
    prep_root = small["aptos2019"][1]
    with pytest.raises(data.DataError, match=r"option seed=0, but seed=1 was asked for.*--option seed=1"):
        data.get_dataset("aptos2019", prep_root, seed=1)
    with pytest.raises(data.DataError, match=r"option val_fraction=0.15"):
        data.get_dataset("aptos2019", prep_root, val_fraction=0.2)
    with pytest.raises(data.DataError, match=r"a prepared 'aptos2019' dataset .* not 'isic2019'"):
        data.get_dataset("isic2019", prep_root)
    with pytest.raises(data.DataError, match="has no option 'uncertain'"):
        data.get_dataset("aptos2019", prep_root, uncertain="ones")


def test_damaged_or_missing_prepared_files_are_named(small, tmp_path):
    root = str(tmp_path / "copy")
    shutil.copytree(small["aptos2019"][1], root)
    meta = prepared.read_metadata(root)
    shard = next(os.path.join(root, rel) for rel in meta["tfds"]["files"] if "train.array_record" in rel)
    blob = bytearray(open(shard, "rb").read())
    blob[len(blob) // 2] ^= 0xFF
    open(shard, "wb").write(bytes(blob))
    data.get_dataset("aptos2019", root, check_images="exists")  # present: 'exists' passes
    with pytest.raises(data.DataError, match=r"train\.array_record.*damaged file.*prepare the dataset again"):
        data.get_dataset("aptos2019", root)
    os.remove(shard)
    with pytest.raises(data.DataError, match=r"train\.array_record.*is missing"):
        data.get_dataset("aptos2019", root, check_images="exists")


def _error_line(proc):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines and lines[-1].startswith("error: "), proc.stderr[-2000:]
    assert not any(line.startswith("Traceback") for line in lines)
    return lines[-1]


def test_bad_images_stop_the_prepare_with_one_line_and_leave_nothing(tmp_path):
    raw = fake.write("aptos2019", str(tmp_path / "raw"), 12, seed=3, size=32)["root"]
    ds = data.get_dataset("aptos2019", raw)
    victim = ds.splits["train"][1]
    with open(victim.path, "r+b") as f:
        f.truncate(60)  # a cut PNG: its header is there, the pixels are not
    out = str(tmp_path / "out")
    line = _error_line(run_cli("medjax.data", "prepare", "--dataset", "aptos2019", "--root", raw, "--output", out,
                               "--workers", "1", check=False))
    assert victim.path in line and victim.origin in line and "1 of 12 images cannot be read" in line
    assert not os.path.exists(out)
    proc = run_cli("medjax.data", "prepare", "--dataset", "aptos2019", "--root", raw, "--output", out, "--workers",
                   "1", "--skip-bad-images")
    summary = json.loads(proc.stdout)
    assert summary["skipped"] == 1 and sum(summary["images"].values()) == 11
    pre = data.get_dataset("aptos2019", out)
    assert [s["image"] for s in pre.skipped_images] == [os.path.relpath(victim.path, raw)]
    os.remove(victim.path)  # a missing file is named by the start-up check, before any decoding
    line = _error_line(run_cli("medjax.data", "prepare", "--dataset", "aptos2019", "--root", raw, "--output",
                               str(tmp_path / "out2"), check=False))
    assert victim.path in line and "file not found" in line and not os.path.exists(tmp_path / "out2")


def test_output_conflicts_are_refused(small, tmp_path):
    raw_root, prep_root = small["aptos2019"]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    line = _error_line(run_cli("medjax.data", "prepare", "--dataset", "aptos2019", "--root", raw_root, "--output",
                               str(busy), check=False))
    assert "not empty (notes.txt)" in line and (busy / "notes.txt").read_text() == "mine"
    line = _error_line(run_cli("medjax.data", "prepare", "--dataset", "aptos2019", "--root", raw_root, "--output",
                               prep_root, "--max-size", "128", check=False))
    assert "already holds a prepared dataset made otherwise (max_size: 256 there, 128 asked)" in line
    line = _error_line(run_cli("medjax.data", "prepare", "--dataset", "aptos2019", "--root", raw_root, "--output",
                               raw_root, check=False))
    assert "holds the raw dataset" in line
    line = _error_line(run_cli("medjax.data", "prepare", "--dataset", "aptos2019", "--root", prep_root, "--output",
                               str(tmp_path / "again"), check=False))
    assert "is itself a prepared dataset" in line


# ------------------------------------------------------------------------------------------------ JPEG draft, bench

def test_jpeg_draft_decodes_at_a_reduced_scale_within_a_few_grey_levels(tmp_path):
    rng = np.random.default_rng(0)
    img = fake.class_image(rng, 900, 1200, 3, 1, 5)
    path = str(tmp_path / "big.jpg")
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
    full, draft = transforms.decode(path, 3), transforms.decode(path, 3, draft=256)
    assert full.size == (1200, 900) and draft.size == (600, 450)  # 1/2: the largest scale keeping both sides >= 256
    assert transforms.decode(path, 3, draft=1000).size == (1200, 900)  # not twice the target: a full decode
    png = str(tmp_path / "big.png")
    full.save(png)
    assert transforms.decode(png, 3, draft=256).size == (1200, 900)  # only JPEGs
    diff = np.abs(transforms.eval_transform(full, 224).astype(int) - transforms.eval_transform(draft, 224))
    assert 0 < diff.mean() < 0.6 and np.percentile(diff, 99.9) <= 6, (diff.mean(), diff.max())
    assert data.OPTIONS["isic2019"]["jpeg_draft"][0] is True


def test_bench_cli_prints_rate_and_cpu_per_image(small):
    for root in small["aptos2019"]:
        proc = run_cli("medjax.data", "bench", "--dataset", "aptos2019", "--root", root, "--batches", "2",
                       "--batch-size", "4", "--image-size", "32", "--warmup", "1")
        values = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
        assert float(values["images/s"]) > 0 and float(values["cpu ms/image"]) > 0
        assert float(values["images/s per core"]) == pytest.approx(1000 / float(values["cpu ms/image"]), rel=0.01)
        assert values["load average (1 min)"].endswith(f"on {os.cpu_count()} cores")
        assert ("prepared" in proc.stdout) == (root == small["aptos2019"][1])


def test_a_record_that_is_not_the_metadata_s_is_never_fed_with_its_label(small, tmp_path):
    root = str(tmp_path / "copy")
    shutil.copytree(small["aptos2019"][1], root)
    meta_path = os.path.join(root, prepared.METADATA)
    meta = json.load(open(meta_path))
    rows = meta["splits"]["val"]
    rows[0], rows[1] = rows[1], rows[0]  # metadata that does not match the ArrayRecord files
    meta[prepared.DIGEST_KEY] = prepared.metadata_digest(meta)  # re-signed: the loader's own guard is the point
    json.dump(meta, open(meta_path, "w"))
    ds = data.get_dataset("aptos2019", root)
    batch = next(data.make_loader(ds, "val", batch_size=4, image_size=16, train=False, shard_index=0, shard_count=1))
    assert batch["mask"].tolist() == [False, False, True, True]
    assert all("do not match medjax_prepared.json" in s["reason"] for s in ds.skipped_images)
    # the loader may decode a batch's images on several threads: the order of the reports is not fixed
    assert sorted(s["image"] for s in ds.skipped_images) == sorted([rows[0][0], rows[1][0]])
