"""The `volumes` dataset (3-D studies: DICOM folders ordered by position, PNG folders, multi-frame DICOM, NIfTI),
written here by hand with pydicom / Pillow / nibabel, and the frozen protocols' per-volume features: slice averaging
equals averaging the per-slice outputs computed one by one."""

import os

import numpy as np
import pytest

from medjax.data import DataError, describe, get_dataset, make_loader, volumes

pydicom = pytest.importorskip("pydicom")
nibabel = pytest.importorskip("nibabel")


def _dicom(path, pixels, position=None, instance=None, slope=1.0, intercept=0.0, frames=None):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "CT", "MONOCHROME2", 1
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if frames:
        ds.NumberOfFrames = frames
    if position is not None:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(position)]
    if instance is not None:
        ds.InstanceNumber = instance
    ds.PixelData = np.ascontiguousarray(pixels, np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _slice(value, shape=(20, 24)):
    """A slice whose values encode its index: a ramp plus value."""
    return (np.arange(shape[0] * shape[1]).reshape(shape) % 7 + value).astype(np.uint16)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Four kinds of volume, two classes, four patients."""
    from PIL import Image

    root = tmp_path_factory.mktemp("volumes")
    # a DICOM folder whose file names run against the slice positions (z = 5, 10, 15 for c.dcm, b.dcm, a.dcm)
    os.makedirs(root / "ct1")
    for name, z, value in (("a.dcm", 15.0, 300), ("b.dcm", 10.0, 200), ("c.dcm", 5.0, 100)):
        _dicom(str(root / "ct1" / name), _slice(value), position=z, slope=2.0, intercept=-1024.0)
    # a DICOM folder without positions: InstanceNumber orders it
    os.makedirs(root / "ct2")
    for name, instance, value in (("x1.dcm", 2, 50), ("x2.dcm", 1, 10)):
        _dicom(str(root / "ct2" / name), _slice(value), instance=instance)
    # PNG slices in natural name order (slice2 before slice10)
    os.makedirs(root / "png1")
    for i, name in enumerate(("slice1.png", "slice2.png", "slice10.png")):
        Image.fromarray(np.full((16, 16), 40 * (i + 1), np.uint8)).save(root / "png1" / name)
    # a multi-frame DICOM and a NIfTI volume
    _dicom(str(root / "mf.dcm"), np.stack([_slice(v) for v in (5, 25, 45, 65, 85)]), frames=5)
    data = np.random.default_rng(0).uniform(-100, 400, size=(12, 10, 4))
    nibabel.save(nibabel.Nifti1Image(data.astype(np.float32), np.eye(4)), str(root / "brain.nii.gz"))
    (root / "volumes.csv").write_text(
        "volume,label,patient\nct1,tumour,p1\nct2,normal,p2\npng1,tumour,p3\nmf.dcm,normal,p4\n"
        "brain.nii.gz,tumour,p4\n")
    return str(root)


def test_slices_in_position_order_with_the_modality_lut(root):
    vol = volumes.load_volume(os.path.join(root, "ct1"))
    assert vol.shape == (3, 20, 24) and vol.dtype == np.uint8
    hu = np.stack([_slice(v).astype(np.float64) * 2.0 - 1024.0 for v in (100, 200, 300)])  # z = 5, 10, 15
    expected = np.clip(np.rint((hu - hu.min()) * (255.0 / (hu.max() - hu.min()))), 0, 255).astype(np.uint8)
    assert np.array_equal(vol, expected)
    windowed = volumes.load_volume(os.path.join(root, "ct1"), {"window": "-700,600"})  # [-1000, -400] -> 0..255
    assert np.array_equal(windowed, np.clip(np.rint((hu + 1000) * (255 / 600)), 0, 255).astype(np.uint8))
    ct2 = volumes.load_volume(os.path.join(root, "ct2"))
    assert ct2[0].mean() < ct2[1].mean()  # InstanceNumber 1 (value 10) first, though its file name sorts last


def test_png_multiframe_and_nifti_volumes(root):
    png = volumes.load_volume(os.path.join(root, "png1"))
    assert [int(s[0, 0]) for s in png] == [40, 80, 120]  # natural order, 8-bit values kept
    mf = volumes.load_volume(os.path.join(root, "mf.dcm"))
    assert mf.shape == (5, 20, 24) and list(mf[:, 0, 0]) == sorted(mf[:, 0, 0])
    nii = volumes.load_volume(os.path.join(root, "brain.nii.gz"))
    data = np.asarray(nibabel.load(os.path.join(root, "brain.nii.gz")).get_fdata())
    ref = np.transpose(data, (2, 1, 0))
    assert nii.shape == (4, 10, 12)
    assert np.array_equal(nii, np.clip(np.rint((ref - ref.min()) * (255 / (ref.max() - ref.min()))), 0,
                                       255).astype(np.uint8))


def test_slice_sampling():
    assert list(volumes.slice_indices(10, 0, "uniform")) == list(range(10))
    assert list(volumes.slice_indices(10, 4, "uniform")) == [0, 3, 6, 9]
    assert list(volumes.slice_indices(10, 4, "center")) == [3, 4, 5, 6]
    assert list(volumes.slice_indices(3, 5, "center")) == [0, 1, 2]


def test_the_dataset_reads_splits_and_describes(root, tmp_path):
    ds = get_dataset("volumes", root, workdir=str(tmp_path), val_fraction=0.2, test_fraction=0.2, max_slices=2)
    assert ds.class_names == ["normal", "tumour"] and ds.channels == 1 and ds.target_metric == "roc_auc"
    found = {r.patient: s for s, recs in ds.splits.items() for r in recs}
    assert sorted(found) == ["p1", "p2", "p3", "p4"] and len(sum(ds.splits.values(), [])) == 5
    p4 = {s for s, recs in ds.splits.items() for r in recs if r.patient == "p4"}
    assert len(p4) == 1  # both volumes of p4 in one split
    d = describe(ds)
    assert sum(v["images"] for v in d["splits"].values()) == 5
    assert 0 < ds.mean[0] < 1 and ds.std[0] > 0
    batch = next(make_loader(ds, "train", batch_size=2, image_size=16, train=True, shard_index=0, shard_count=1))
    assert batch["image"].shape == (2, 2, 16, 16, 1)  # max_slices slices per volume (fine-tuning)
    all_slices = get_dataset("volumes", root, val_fraction=0.2, test_fraction=0.2)
    with pytest.raises(DataError, match="set the data option max_slices"):  # batches need a fixed slice count
        make_loader(all_slices, "train", batch_size=2, train=True)


@pytest.mark.parametrize("csv, message", [
    ("volume,label\nct1,tumour\nmissing,normal\n", "volumes.csv line 3: volume .*missing does not exist"),
    ("volume,label\nct1,tumour\nct2,cyst\n", "volumes.csv line 3: label 'cyst' is not a class; classes: normal, "
                                             "tumour"),
    ("volume,label\nct1,tumour\nvolumes.csv,normal\n", "line 3: volume .*volumes.csv is not a folder of slices"),
    ("volume,label,split\nct1,tumour,train\nct2,normal,\n", "line 3: column 'split' is empty"),
    ("volume,label,split\nct1,tumour,train\nct2,normal,holdout\n", "line 3: split 'holdout'"),
    ("volume,grade\nct1,tumour\n", "missing column\\(s\\) 'label'"),
])
def test_bad_csv_rows_name_the_line(root, tmp_path, csv, message):
    import shutil

    for name in ("ct1", "ct2"):
        shutil.copytree(os.path.join(root, name), tmp_path / name)
    (tmp_path / "volumes.csv").write_text(csv)
    with pytest.raises(DataError, match=message):
        get_dataset("volumes", str(tmp_path), class_names=["normal", "tumour"])


def test_an_unreadable_volume_is_named(tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DataError, match="volume .*empty: a folder without slices"):
        volumes.load_volume(str(tmp_path / "empty"))
    (tmp_path / "bad.nii").write_bytes(b"not nifti")
    with pytest.raises(DataError, match="volume .*bad.nii: cannot read it"):
        volumes.load_volume(str(tmp_path / "bad.nii"))
    with pytest.raises(DataError, match="window='40': expected 'CENTER,WIDTH'"):
        volumes.load_volume(str(tmp_path / "bad.nii"), {"window": "40"})


def test_volume_features_are_the_mean_of_the_slices_embedded_one_by_one(root, tmp_path, matmul_f32):
    """Batches of 4 slices straddle the volumes (3, 2, 3, 5 and 4 slices); every volume's feature must equal the mean
    of its slices' features computed alone (batch of one)."""
    import jax

    import converters
    from medjax.protocols import features
    from medjax.testing import fixture_path

    params = str(tmp_path / "dino")
    converters.convert(fixture_path("dinov2", "checkpoint.pth"), params, "dinov2",
                       fixture_path("dinov2", "config.json"))
    ds = get_dataset("volumes", root, workdir=str(tmp_path), val_fraction=0.2, test_fraction=0.2)
    feats, info = features.cached_features(params, ds, ("train", "val", "test"), str(tmp_path), image_size=28,
                                           num_blocks=2, batch_size=4, normalization="dataset", log=None)
    config, variables = features.load_backbone_for(params, ds)
    fn = jax.jit(features.make_feature_fn(config, info["num_blocks"]))
    mean, std = np.asarray(ds.mean, np.float32), np.asarray(ds.std, np.float32)
    for split, records in ds.splits.items():
        f = feats[split]
        assert list(f.paths) == [r.path for r in records] and list(f.labels) == [r.label for r in records]
        for i, r in enumerate(records):
            images = volumes.slice_images(volumes.load_volume(r.path, ds.options), 28)
            one_by_one = [jax.device_get(fn(variables, ((s.astype(np.float32) * (1 / (255 * std)) - mean / std)
                                                         [None]).astype(np.float32))) for s in images]
            cls = np.mean([o["cls"][0] for o in one_by_one], axis=0, dtype=np.float64)
            pooled = np.mean([o["patch_mean"][0] for o in one_by_one], axis=0, dtype=np.float64)
            np.testing.assert_allclose(f.cls[i], cls, atol=2e-5, rtol=1e-5)
            np.testing.assert_allclose(f.patch_mean[i], pooled, atol=2e-5, rtol=1e-5)
    # not the mean of a single slice: the averaging is real
    first = ds.splits["train"][0]
    single = jax.device_get(fn(variables, np.zeros((1, 28, 28, 1), np.float32)))["cls"][0]
    assert feats["train"].cls.shape[1:] == single.shape and len(volumes.load_volume(first.path)) > 1


def test_fake_volumes_in_every_form_read_back_in_slice_order(tmp_path):
    """`python -m medjax.data fake --dataset volumes`: PNG-slice folders, CT DICOM folders with shuffled file names
    and NIfTI files, read back by the reader; the DICOM slices come back in ImagePositionPatient order (checked here
    with pydicom directly) and the lesion volumes carry their signal in the middle slices."""
    import pydicom

    from medjax.data import fake

    root = str(tmp_path / "vol")
    fake.write("volumes", root, 9, seed=3, size=24)
    ds = get_dataset("volumes", root)
    assert sum(len(r) for r in ds.splits.values()) == 9
    summary = describe(ds)
    assert set(summary["splits"]) <= {"train", "val", "test"}
    forms = {"png": 0, "dicom": 0, "nifti": 0}
    for records in ds.splits.values():
        for r in records:
            form = os.path.relpath(r.path, root).split(os.sep)[0]
            forms[form] += 1
            vol = volumes.load_volume(r.path)
            assert vol.ndim == 3 and vol.shape[1:] == (24, 24) and 6 <= len(vol) <= 10
            if form == "dicom":
                files = sorted(os.listdir(r.path))
                by_z = sorted(files, key=lambda f: float(pydicom.dcmread(os.path.join(r.path,
                                                                                      f)).ImagePositionPatient[2]))
                assert by_z != files  # the file names are shuffled ...
                stored = [pydicom.dcmread(os.path.join(r.path, f)).pixel_array.astype(np.float64) for f in by_z]
                order = np.argsort([np.corrcoef(vol[0].ravel(), s.ravel())[0, 1] for s in stored])[::-1]
                assert order[0] == 0  # ... and the first slice read back is the lowest position's
            if ds.class_names[r.label] == "lesion":
                middle, ends = vol[len(vol) // 2].astype(float), np.stack([vol[0], vol[-1]]).astype(float)
                assert middle.max() > ends.max() - 1e-9 and (middle >= 200).sum() > (ends >= 200).sum() / 2
    assert all(n >= 3 for n in forms.values()), forms


def test_fine_tuning_on_volumes_averages_the_slices_logits(tmp_path):
    """The trainer on 3-D studies: each row is max_slices slices (eval transform here), the classifier's logits for
    a volume are the mean of its slices' logits computed one by one, and a run trains and tests end to end."""
    import jax
    from PIL import Image

    from medjax import classifier, train
    from medjax.data import fake
    from medjax.data.transforms import eval_transform
    from medjax.schema import make

    root = str(tmp_path / "vol")
    fake.write("volumes", root, 18, seed=5, size=24)
    ds = get_dataset("volumes", root, max_slices=4)
    batch = next(make_loader(ds, "val", batch_size=2, image_size=16, train=False, shard_index=0, shard_count=1))
    assert batch["image"].shape == (2, 4, 16, 16, 1)
    record = ds.splits["val"][0]
    vol = volumes.load_volume(record.path, {**ds.options, "max_slices": 0})
    keep = volumes.fixed_slices(len(vol), 4, "uniform")
    raw = np.stack([eval_transform(Image.fromarray(vol[i], "L"), 16) for i in keep]).astype(np.float32) / 255
    mean, std = ds.mean[0], ds.std[0]
    np.testing.assert_allclose(batch["image"][0], (raw - mean) / std, atol=1e-5)

    arch = {"block": "basic", "layers": (1, 1, 1, 1), "num_classes": 0, "img_size": 16}
    cfg = make({"model.family": "resnet", "model.architecture": arch, "model.freeze": "full"}).model
    model, variables = classifier.build_classifier(cfg, 2, 1, 16, jax.random.PRNGKey(0))
    with jax.default_matmul_precision("float32"):
        together = np.asarray(model.apply(variables, batch["image"]))
        one_by_one = np.stack([np.mean([np.asarray(model.apply(variables, batch["image"][b, s][None]))[0]
                                        for s in range(4)], axis=0) for b in range(2)])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)

    config = make({"dataset": "volumes", "data_root": root, "data_options.max_slices": 4, "image_size": 16,
                   "compute_dtype": "float32", "model.family": "resnet", "model.architecture": arch,
                   "model.freeze": "full", "batch_size": 4, "total_steps": 2, "eval_every": 2, "progress_bar": False})
    result = train.Trainer(config, str(tmp_path / "run")).run()
    assert result["best_step"] == 2 and result["test"]["num_examples"] == len(ds.splits["test"])
