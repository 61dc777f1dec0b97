"""Real DICOM (issue 15 item 2): every single-frame image in the DICOM files that ship inside pydicom decodes, in every
common transfer syntax, and lossless encodings of one image decode to the same pixels. Nothing is downloaded: the
files are read from the installed package's data/test_files folder (never get_testdata_file)."""

import os
import shutil

import numpy as np
import pydicom
import pytest

from medjax import data
from medjax.data import DataError
from medjax.data.transforms import decode

FILES = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")
# Shipped on purpose as broken (pydicom's test_files/README.txt): they must fail with the file and its syntax.
INVALID = {"JPEG-lossy.dcm": "non-conforming 12-bit JPEG (JPGExtended.dcm is its fixed version)",
           "JPEG2000-embedded-sequence-delimiter.dcm": "pixel bytes overwritten by a sequence delimiter",
           "MR_truncated.dcm": "pixel data cut short", "badVR.dcm": "NumberOfFrames '1A'"}
SYNTAXES = {  # the transfer syntaxes the issue names, by UID
    "1.2.840.10008.1.2": "implicit VR little endian", "1.2.840.10008.1.2.1": "explicit VR little endian",
    "1.2.840.10008.1.2.2": "explicit VR big endian", "1.2.840.10008.1.2.1.99": "deflated explicit VR little endian",
    "1.2.840.10008.1.2.5": "RLE lossless", "1.2.840.10008.1.2.4.50": "JPEG baseline",
    "1.2.840.10008.1.2.4.51": "JPEG extended (12-bit)", "1.2.840.10008.1.2.4.70": "JPEG lossless (process 14)",
    "1.2.840.10008.1.2.4.80": "JPEG-LS lossless", "1.2.840.10008.1.2.4.81": "JPEG-LS near-lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 lossless", "1.2.840.10008.1.2.4.91": "JPEG 2000"}


def _header(name):
    return pydicom.dcmread(os.path.join(FILES, name), force=True, stop_before_pixels=False)


def _single_frame_images():
    out = []
    for name in sorted(os.listdir(FILES)):
        if not name.endswith(".dcm"):
            continue
        ds = _header(name)
        if "PixelData" not in ds or "Rows" not in ds or "Columns" not in ds:
            continue
        try:
            frames = int(str(ds.get("NumberOfFrames", 1) or 1))
        except ValueError:
            frames = 1
        if frames == 1:
            syntax = ds.file_meta.get("TransferSyntaxUID") if "file_meta" in ds.__dict__ else None
            out.append((name, str(syntax) if syntax else None, str(ds.get("PhotometricInterpretation", ""))))
    return out


IMAGES = _single_frame_images()


def _pixels(name, channels=3):
    return np.asarray(decode(os.path.join(FILES, name), channels)).astype(int)


def test_every_single_frame_image_decodes_in_every_common_syntax():
    covered, photometric = set(), set()
    for name, syntax, pi in IMAGES:
        if name in INVALID:
            continue
        img = decode(os.path.join(FILES, name), 3)
        assert img.mode == "RGB" and img.size[0] > 0
        covered.add(syntax)
        photometric.add(pi)
    missing = {uid: what for uid, what in SYNTAXES.items() if uid not in covered}
    assert not missing, f"no decoded test file in {missing}"
    assert {"MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR"} <= photometric
    assert len(IMAGES) - len(INVALID) >= 45


@pytest.mark.parametrize("group", [
    # one image, lossless in several syntaxes: the same pixels
    ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm", "MR_small_implicit.dcm",
     "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_padded.dcm"],
    ["SC_rgb_rle.dcm", "SC_rgb_rle_16bit.dcm", "SC_rgb_rle_32bit.dcm", "SC_rgb_jpeg_gdcm.dcm", "SC_rgb_gdcm_KY.dcm"],
    # one lossy JPEG's pixels, as YBR 4:2:2 uncompressed and as JPEG baseline in YBR
    ["SC_ybr_full_422_uncompressed.dcm", "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_dcmtk_+eb+cy+s2.dcm"],
    ["rtdose_1frame.dcm", "rtdose_expb_1frame.dcm", "rtdose_rle_1frame.dcm"],
    ["liver_1frame.dcm", "liver_expb_1frame.dcm"],
    ["SC_rgb_small_odd.dcm", "SC_rgb_small_odd_big_endian.dcm"],
])
def test_lossless_encodings_decode_to_the_same_pixels(group):
    reference = _pixels(group[0])
    assert reference.std() > 0
    for name in group[1:]:
        np.testing.assert_array_equal(_pixels(name), reference, err_msg=name)


@pytest.mark.parametrize("name, max_error", [
    ("SC_rgb_jls_lossy_line.dcm", 2), ("SC_rgb_jls_lossy_sample.dcm", 2),  # JPEG-LS near-lossless, NEAR=2
    ("SC_rgb_dcmtk_+eb+cr.dcm", 1), ("SC_rgb_jpeg_dcmtk.dcm", 6),  # JPEG baseline, RGB and YBR
])
def test_lossy_encodings_stay_close_to_the_lossless_image(name, max_error):
    reference = _pixels("SC_rgb_rle.dcm")
    assert np.abs(_pixels(name) - reference).max() <= max_error


def test_palette_colour_through_its_lookup_table():
    ds = pydicom.dcmread(os.path.join(FILES, "examples_palette.dcm"))
    index = ds.pixel_array.astype(int)
    rgb = []
    for colour in ("Red", "Green", "Blue"):
        entries, first, bits = ds[f"{colour}PaletteColorLookupTableDescriptor"].value
        lut = np.frombuffer(ds[f"{colour}PaletteColorLookupTableData"].value, "<u2" if bits == 16 else "u1")
        rgb.append(lut[np.clip(index - first, 0, (entries or 65536) - 1)] / (2 ** bits - 1) * 255)
    expected = np.rint(np.stack(rgb, -1)).astype(int)
    np.testing.assert_array_equal(_pixels("examples_palette.dcm"), expected)


def test_monochrome_gets_the_window_and_a_grayscale_image():
    img = decode(os.path.join(FILES, "CT_small.dcm"), 1)
    assert img.mode == "L" and np.asarray(img).min() == 0 and np.asarray(img).max() == 255


def test_undecodable_and_multi_frame_files_name_the_file_and_the_syntax(tmp_path):
    root = tmp_path / "own"
    os.makedirs(root / "images")
    for name in ("MR_small_RLE.dcm", "JPEG-lossy.dcm", "JPEG2000-embedded-sequence-delimiter.dcm", "rtdose.dcm"):
        shutil.copy(os.path.join(FILES, name), root / "images" / name)
    (root / "labels.csv").write_text("image,label\nimages/MR_small_RLE.dcm,a\nimages/JPEG-lossy.dcm,b\n"
                                     "images/JPEG2000-embedded-sequence-delimiter.dcm,a\nimages/rtdose.dcm,b\n")
    with pytest.raises(DataError) as err:
        data.get_dataset("csv", str(root), channels=1)
    message = str(err.value)
    assert message.startswith("3 of 4 images cannot be read")
    assert ("JPEG-lossy.dcm (" in message and "labels.csv line 3): cannot decode (ValueError: cannot decode the "
            "pixel data of transfer syntax JPEG Extended (Process 2 and 4) (1.2.840.10008.1.2.4.51)" in message)
    assert "transfer syntax JPEG 2000 Image Compression (1.2.840.10008.1.2.4.91)" in message
    assert "rtdose.dcm (" in message and "multi-frame DICOM (15 frames)" in message
    with pytest.raises(ValueError, match="no pixel data: not an image DICOM \\(SOP class RT Plan Storage\\)"):
        decode(os.path.join(FILES, "rtplan.dcm"), 1)
