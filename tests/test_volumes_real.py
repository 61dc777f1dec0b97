"""Volumes from real files that packages ship (issue 22 A): pydicom's test files, the `pydicom-data` package's files
(`pip install pydicom-data`, in the `test` extra) and nibabel's tests/data, each read by the volume reader (and the
2-D reader for big-endian palette colour) and compared with an independent pydicom / nibabel computation made here.
The files are taken from the installed packages' folders (never `get_testdata_file`, which may download)."""

import os
import shutil

import numpy as np
import pytest

from medjax.data import DataError, volumes
from medjax.data.transforms import decode
from medjax.testing import run_cli

pydicom = pytest.importorskip("pydicom")
nibabel = pytest.importorskip("nibabel")
pixels = pytest.importorskip("pydicom.pixels")

PYDICOM_FILES = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")
DIRTESTS = os.path.join(PYDICOM_FILES, "dicomdirtests")
NIBABEL_FILES = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data")
try:
    import data_store  # the pydicom-data package

    PYDICOM_DATA = os.path.join(os.path.dirname(data_store.__file__), "data")
except ImportError:
    PYDICOM_DATA = None
needs_pydicom_data = pytest.mark.skipif(PYDICOM_DATA is None, reason="pydicom-data is not installed")

CT5N = os.path.join(DIRTESTS, "98892001", "CT5N")  # 5 axial CT slices, files without extension or preamble check
CT2N = os.path.join(DIRTESTS, "98892001", "CT2N")  # 2 scouts (ImageType ORIGINAL\PRIMARY\LOCALIZER)
CT2 = os.path.join(DIRTESTS, "77654033", "CT2")  # 4 axial CT slices of another study
MR1 = os.path.join(DIRTESTS, "98892003", "MR1")  # 3 series of one slice each
MR2 = os.path.join(DIRTESTS, "98892003", "MR2")  # 3 pilot series, slices of 2-3 orientations


# ------------------------------------------------------------------------------------------------ references


def _minmax(values, lo=None, hi=None):
    """The reference mapping: finite values (or the window lo..hi) to 0..255, NaN / inf to 0."""
    finite = np.isfinite(values)
    if lo is None:
        lo, hi = values[finite].min(), values[finite].max()
    out = np.zeros(values.shape, np.uint8)
    out[finite] = np.clip(np.rint((values[finite] - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    return out


def _assert_close(got, expected):
    """Equal but for rounding at a half grey level (float order of operations)."""
    assert got.shape == expected.shape and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999, (diff.max(), (diff == 0).mean())


def _series_reference(folder, files=None):
    """A DICOM folder read with pydicom alone: every file, sorted along the slice normal, modality LUT, min..max."""
    sets = [pydicom.dcmread(os.path.join(folder, f)) for f in (files or os.listdir(folder))]
    o = np.asarray(sets[0].ImageOrientationPatient, float)
    normal = np.cross(o[:3], o[3:])
    sets.sort(key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))
    return _minmax(np.stack([pixels.apply_modality_lut(ds.pixel_array, ds).astype(float) for ds in sets]))


def _luma(rgb):
    rgb = rgb.astype(float)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _copy(dst, *sources):
    os.makedirs(dst, exist_ok=True)
    for src in sources:
        if os.path.isdir(src):
            for f in os.listdir(src):
                shutil.copy(os.path.join(src, f), dst)
        else:
            shutil.copy(src, dst)
    return str(dst)


# ------------------------------------------------------------------------------------------------ NIfTI


def _canonical_reference(path):
    """nibabel's orientation arithmetic by hand: the voxel axes permuted and flipped to R, A, S."""
    image = nibabel.load(path)
    transform = nibabel.orientations.ornt_transform(nibabel.orientations.io_orientation(image.affine),
                                                    nibabel.orientations.axcodes2ornt("RAS"))
    data = nibabel.orientations.apply_orientation(image.get_fdata(), transform)
    return np.transpose(data, (2, 1, 0))


def test_nifti_nan_voxels_are_background_and_the_rest_maps_by_its_own_range():
    path = os.path.join(NIBABEL_FILES, "resampled_anat_moved.nii")  # 153 NaN voxels of 1071
    values = _canonical_reference(path)
    assert np.isnan(values).sum() > 100
    got = volumes.load_volume(path)
    _assert_close(got, _minmax(values))
    assert (got[np.isnan(values)] == 0).all() and got.max() == 255
    windowed = volumes.load_volume(path, {"window": "3000,4000"})
    _assert_close(windowed, _minmax(values, 1000.0, 5000.0))
    assert (windowed[np.isnan(values)] == 0).all()


def test_nifti_is_read_in_the_closest_canonical_orientation_whatever_its_affine(tmp_path):
    path = os.path.join(NIBABEL_FILES, "anatomical.nii")  # stored L, A, S: the first voxel axis runs to the left
    assert nibabel.aff2axcodes(nibabel.load(path).affine) == ("L", "A", "S")
    got = volumes.load_volume(path)
    _assert_close(got, _minmax(_canonical_reference(path)))
    # the same image stored with its voxel axes permuted and flipped (posterior, superior, right): the same slices
    image = nibabel.load(path)
    moved = image.as_reoriented(nibabel.orientations.ornt_transform(nibabel.orientations.io_orientation(image.affine),
                                                                    nibabel.orientations.axcodes2ornt("PSR")))
    assert nibabel.aff2axcodes(moved.affine) == ("P", "S", "R")
    nibabel.save(moved, str(tmp_path / "psr.nii.gz"))
    np.testing.assert_array_equal(volumes.load_volume(str(tmp_path / "psr.nii.gz")), got)


# ------------------------------------------------------------------------------------------------ enhanced CT


def _enhanced_reference(ds):
    """Per frame: the functional groups' rescale (own, else shared); frames along the normal of the plane
    orientation by their plane position."""
    shared = ds.SharedFunctionalGroupsSequence[0]
    raw = ds.pixel_array.astype(float)
    frames, keys = [], []
    for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        pvt = (item if "PixelValueTransformationSequence" in item else shared).PixelValueTransformationSequence[0]
        frames.append(raw[i] * float(pvt.RescaleSlope) + float(pvt.RescaleIntercept))
        o = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
        keys.append(float(np.dot(np.cross(o[:3], o[3:]), item.PlanePositionSequence[0].ImagePositionPatient)))
    return np.stack([frames[i] for i in np.argsort(keys, kind="stable")])


@needs_pydicom_data
def test_enhanced_ct_windows_apply_to_hounsfield_units_from_the_functional_groups():
    path = os.path.join(PYDICOM_DATA, "eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    assert "RescaleIntercept" not in ds  # the rescale lives only in the functional groups
    hu = _enhanced_reference(ds)
    got = volumes.load_volume(path, {"window": "40,400"})
    _assert_close(got, _minmax(hu, -160.0, 240.0))
    assert (got == 255).mean() < 0.01  # raw values through the window: 36% white


@needs_pydicom_data
def test_enhanced_ct_per_frame_rescale_and_plane_positions(tmp_path):
    """The same file with the rescale moved into each frame's own groups (different per frame) and the frames'
    positions swapped: the per-frame values and the new order are followed."""
    ds = pydicom.dcmread(os.path.join(PYDICOM_DATA, "eCT_Supplemental.dcm"))
    shared = ds.SharedFunctionalGroupsSequence[0]
    template = shared.PixelValueTransformationSequence[0]
    del shared.PixelValueTransformationSequence
    frames = ds.PerFrameFunctionalGroupsSequence
    for item, intercept in zip(frames, (-1024.0, -900.0)):
        pvt = pydicom.Dataset()
        pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = "1", str(intercept), template.RescaleType
        item.PixelValueTransformationSequence = pydicom.Sequence([pvt])
    a, b = (f.PlanePositionSequence[0] for f in frames)
    a.ImagePositionPatient, b.ImagePositionPatient = list(b.ImagePositionPatient), list(a.ImagePositionPatient)
    ds.save_as(tmp_path / "ect.dcm")
    hu = _enhanced_reference(pydicom.dcmread(tmp_path / "ect.dcm"))
    _assert_close(volumes.load_volume(str(tmp_path / "ect.dcm"), {"window": "40,400"}), _minmax(hu, -160.0, 240.0))


# ------------------------------------------------------------------------------------------------ palette colour


@needs_pydicom_data
@pytest.mark.parametrize("name, twin", [("OBXXXX1A.dcm", "OBXXXX1A.dcm"), ("OBXXXX1A_expb.dcm", "OBXXXX1A.dcm"),
                                        ("OBXXXX1A_2frame.dcm", "OBXXXX1A_2frame.dcm"),
                                        ("gdcm-US-ALOKA-16_big.dcm", "gdcm-US-ALOKA-16.dcm")])
def test_palette_colour_volumes_are_the_luma_of_their_lookup_table(name, twin):
    """Compared with the little-endian twin through pydicom's own lookup (correct for little-endian files)."""
    ds = pydicom.dcmread(os.path.join(PYDICOM_DATA, twin))
    rgb = pixels.apply_color_lut(ds.pixel_array, ds)
    luma = _luma(rgb)
    expected = _minmax(luma if luma.ndim == 3 else luma[None])
    _assert_close(volumes.load_volume(os.path.join(PYDICOM_DATA, name)), expected)


def test_palette_colour_in_pydicoms_own_files():
    ds = pydicom.dcmread(os.path.join(PYDICOM_FILES, "examples_palette.dcm"))
    expected = _minmax(_luma(pixels.apply_color_lut(ds.pixel_array, ds))[None])
    _assert_close(volumes.load_volume(os.path.join(PYDICOM_FILES, "examples_palette.dcm")), expected)


@needs_pydicom_data
def test_big_endian_palette_colour_2d_equals_its_little_endian_twin():
    little, big = (os.path.join(PYDICOM_DATA, n) for n in ("OBXXXX1A.dcm", "OBXXXX1A_expb.dcm"))
    ds = pydicom.dcmread(little)
    rgb = pixels.apply_color_lut(ds.pixel_array, ds)  # 16-bit entries, scaled by the table's bit depth
    expected = np.clip(np.rint(rgb.astype(np.float32) * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(decode(little, 3)), expected)
    np.testing.assert_array_equal(np.asarray(decode(big, 3)), expected)


@needs_pydicom_data
def test_a_file_without_file_meta_reads_as_in_the_2d_reader():
    path = os.path.join(PYDICOM_DATA, "OT-PAL-8-face.dcm")  # no preamble, no file meta, palette colour
    ds = pydicom.dcmread(path, force=True)
    assert "TransferSyntaxUID" not in getattr(ds, "file_meta", {})
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian  # what the file is written in
    expected = _minmax(_luma(pixels.apply_color_lut(ds.pixel_array, ds))[None])
    _assert_close(volumes.load_volume(path), expected)


# ------------------------------------------------------------------------------------------------ DICOM folders


def test_a_folder_of_dicom_files_without_extension_beside_a_dicomdir(tmp_path):
    folder = _copy(tmp_path / "ct", CT5N, os.path.join(DIRTESTS, "DICOMDIR"))
    assert not any("." in f for f in os.listdir(folder))
    _assert_close(volumes.load_volume(folder), _series_reference(CT5N))
    _assert_close(volumes.load_volume(CT5N), _series_reference(CT5N))  # the package's own folder, as it is
    assert volumes.is_dicom(os.path.join(folder, "2062")) and not volumes.is_dicom(os.path.join(DIRTESTS,
                                                                                                "README.txt"))


def test_localizers_are_left_out_of_the_volume(tmp_path):
    folder = _copy(tmp_path / "ct", CT5N, CT2N)  # the scouts sit in their own series here
    _assert_close(volumes.load_volume(folder), _series_reference(CT5N))
    mixed = _copy(tmp_path / "same", CT5N)
    uid = pydicom.dcmread(os.path.join(CT5N, "2062")).SeriesInstanceUID
    for f in os.listdir(CT2N):  # and the same scouts inside the axial series
        ds = pydicom.dcmread(os.path.join(CT2N, f))
        ds.SeriesInstanceUID = uid
        ds.save_as(os.path.join(mixed, "scout" + f))
    _assert_close(volumes.load_volume(mixed), _series_reference(CT5N))
    with pytest.raises(DataError, match=r"CT2N: only localizer images \(ImageType LOCALIZER, 2 files\)"):
        volumes.load_volume(CT2N)


def test_several_series_in_one_folder_stop_with_one_line_until_one_is_picked(tmp_path):
    folder = _copy(tmp_path / "two", CT5N, CT2)
    uids = {d: pydicom.dcmread(os.path.join(d, os.listdir(d)[0])).SeriesInstanceUID for d in (CT5N, CT2)}
    with pytest.raises(DataError) as e:
        volumes.load_volume(folder)
    message = str(e.value)
    assert "\n" not in message and "2 series in one folder" in message and "series=UID" in message
    assert f"{uids[CT5N]} (5 files, CT, SmartScore" in message
    assert f"{uids[CT2]} (4 files, CT, Routine Brain)" in message
    _assert_close(volumes.load_volume(folder, {"series": uids[CT2]}), _series_reference(CT2))
    _assert_close(volumes.load_volume(folder, {"series": f"1.2.3,{uids[CT5N]}"}), _series_reference(CT5N))
    with pytest.raises(DataError, match="the option series names 0 of them"):
        volumes.load_volume(folder, {"series": "1.2.3"})
    # the package's own folders: three one-slice series; three pilot series of mixed orientations
    with pytest.raises(DataError, match=r"MR1: 3 series in one folder \(no series is chosen\)"):
        volumes.load_volume(MR1)
    one = "1.3.6.1.4.1.5962.1.1.0.0.0.1196533885.18148.0.15"
    _assert_close(volumes.load_volume(MR1, {"series": one}), _series_reference(MR1, ["5641"]))
    pilot = "1.3.6.1.4.1.5962.1.1.0.0.0.1196533885.18148.0.136"
    with pytest.raises(DataError, match=f"series {pilot} holds slices of 3 orientations".replace(".", r"\.")):
        volumes.load_volume(MR2, {"series": pilot})


def test_slices_of_different_sizes_or_at_one_position_in_one_series_are_refused(tmp_path):
    folder = _copy(tmp_path / "ct", CT5N)
    ds = pydicom.dcmread(os.path.join(PYDICOM_FILES, "CT_small.dcm"))  # 128 x 128, the series' slices are 16 x 16
    ds.SeriesInstanceUID = pydicom.dcmread(os.path.join(CT5N, "2062")).SeriesInstanceUID
    ds.save_as(os.path.join(folder, "big"))
    with pytest.raises(DataError, match=r"holds slices of 2 sizes \(16x16, 128x128\)"):
        volumes.load_volume(folder)
    repeat = _copy(tmp_path / "repeat", os.path.join(CT5N, "2062"), os.path.join(CT5N, "2392"))
    ds = pydicom.dcmread(os.path.join(CT5N, "2062"))  # a second image at the first one's position (an echo, a repeat)
    ds.SOPInstanceUID += ".1"
    ds.save_as(os.path.join(repeat, "again"))
    with pytest.raises(DataError, match=r"2062 and again lie at the same position \(8\.7625 mm along the slice "):
        volumes.load_volume(repeat)


def test_the_series_error_reaches_the_user_as_one_line(tmp_path):
    root = tmp_path / "root"
    _copy(root / "mixed", CT5N, CT2)
    _copy(root / "ct", CT2)
    (root / "volumes.csv").write_text("volume,label,split\nmixed,a,train\nct,b,train\n")
    proc = run_cli("medjax.data", "describe", "--dataset", "volumes", "--root", str(root), check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "2 series in one folder" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
