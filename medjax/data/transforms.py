"""Decoding and the reference study's train/eval transforms (SPEC section 6) as grain transforms.

Train: resize to 256x256 (bilinear, aspect not kept) -> center crop 224 -> RandomResizedCrop 224 (scale 0.8-1.2,
ratio 3/4-4/3) -> vertical flip p0.5 -> horizontal flip p0.5 -> ColorJitter(brightness 0.2, contrast 0.2,
saturation 0.1, hue 0.1) with p0.8 -> [0, 1] -> normalise. Eval: resize 256 -> center crop 224 -> normalise.
For another output size S the resize is round(S * 256 / 224).

The operations are torchvision's on PIL images (Pillow's antialiased bilinear, ImageEnhance, HSV hue shift), so the
pixels match a torchvision pipeline given the same random draws. One exact rewrite: the flips are taken after the
jitter, as array views (the jitter is per pixel plus a global mean, so they commute). Fusing the resize and the center
crop into one box resize was tried and dropped: about 0.3 ms per 512 px image, but 1-grey-level rounding differences
that the jitter amplifies.

Randomness: every draw of a record comes from `numpy.random.default_rng((seed, 1, epoch, index))`, so a record's
augmentation depends only on the loader seed, the epoch and the record's index in its split, not on sharding,
threads or batch size.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import threading

import grain
import numpy as np
import pydicom
from PIL import Image, ImageEnhance
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from medjax.data.brain_tumor_figshare import read_slice
from medjax.data.records import Record

log = logging.getLogger(__name__)
BILINEAR = Image.Resampling.BILINEAR


# ------------------------------------------------------------------------------------------------------ decode

def _is_dicom(path: str) -> bool:
    if path.lower().endswith((".dcm", ".dicom")):
        return True
    with open(path, "rb") as f:
        head = f.read(132)
    return head[128:132] == b"DICM"


def is_pillow_image(path: str) -> bool:
    """True for files Pillow reads (not DICOM, not MATLAB)."""
    return not path.lower().endswith((".mat",)) and not _is_dicom(path)


def _to_uint8(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scaled = (arr.astype(np.float32) - lo) * (255.0 / max(hi - lo, 1e-12))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _dicom_rgb(arr: np.ndarray, bits: int) -> Image.Image:
    """(rows, cols, 3) samples of `bits` bits -> 8-bit RGB, scaled by the bit depth."""
    if arr.dtype == np.uint8 and bits <= 8:
        return Image.fromarray(arr, "RGB")
    return Image.fromarray(_to_uint8(arr, 0, float(2 ** bits - 1)), "RGB")


def fill_transfer_syntax(ds):
    """The dataset's transfer syntax UID; a file without file meta (old files) gets the uncompressed syntax pydicom
    read it in, so that pydicom can decode its pixel data."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if "file_meta" in ds.__dict__ else None
    if syntax is None:
        implicit, little = ds.original_encoding
        syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        if "file_meta" not in ds.__dict__:
            ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
    return syntax


PALETTE = ("Red", "Green", "Blue", "Alpha")


def palette_rgb(arr: np.ndarray, ds) -> np.ndarray:
    """PALETTE COLOR stored values -> RGB(A) through the file's lookup tables (pydicom's `apply_color_lut`).

    pydicom 3.0's `apply_color_lut` reads unsegmented 16-bit LUT data (OW) in the machine's byte order, so in a
    big-endian file every entry comes out byte-swapped (a near-black image). Here the tables of a big-endian file are
    swapped to little-endian first and handed over in a dataset of their own (the file's dataset is not changed)."""
    fill_transfer_syntax(ds)
    little = ds.file_meta.TransferSyntaxUID.is_little_endian
    if little or "RedPaletteColorLookupTableData" not in ds:
        return apply_color_lut(arr, ds)
    tables = Dataset()
    entries = int(ds.RedPaletteColorLookupTableDescriptor[0]) or 2 ** 16
    for colour in PALETTE:
        for name in (f"{colour}PaletteColorLookupTableDescriptor", f"{colour}PaletteColorLookupTableData"):
            if name in ds:
                setattr(tables, name, ds[name].value)
        data = tables.get(f"{colour}PaletteColorLookupTableData")
        if data is not None and len(data) == 2 * entries:  # 16-bit words: swap each
            setattr(tables, f"{colour}PaletteColorLookupTableData",
                    np.frombuffer(data, ">u2").astype("<u2").tobytes())
    if "PixelPresentation" in ds:
        tables.PixelPresentation = ds.PixelPresentation
    return apply_color_lut(arr, tables)


def _read_dicom(path: str) -> Image.Image:
    """One single-frame image DICOM -> 8-bit 'L' or 'RGB'. Every transfer syntax pydicom and the installed plugins
    (pylibjpeg with libjpeg and openjpeg) decode: uncompressed little/big endian and deflated, RLE, JPEG baseline,
    extended (12-bit) and lossless, JPEG-LS, JPEG 2000. YBR is converted to RGB, palette colour through its LUT
    (`palette_rgb`: big-endian tables read right);
    grayscale gets the modality LUT, the VOI LUT or window, its min-max to 0-255, and MONOCHROME1 is inverted."""
    ds = pydicom.dcmread(path, force=True)
    if "PixelData" not in ds:
        kind = ds.get("SOPClassUID")
        raise ValueError(f"no pixel data: not an image DICOM (SOP class {getattr(kind, 'name', kind) or 'unknown'})")
    if "Rows" not in ds or "Columns" not in ds:
        raise ValueError("pixel data without Rows/Columns: not an image DICOM")
    try:
        frames = int(str(ds.get("NumberOfFrames", 1) or 1))
    except ValueError:
        raise ValueError(f"NumberOfFrames {str(ds.NumberOfFrames)!r} is not a number") from None
    if frames > 1:
        raise ValueError(f"multi-frame DICOM ({frames} frames): only single-frame images are read as 2-D images; a "
                         "multi-frame file is a volume")
    syntax = fill_transfer_syntax(ds)
    try:
        arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - re-raised with the transfer syntax, the file is added by the caller
        name = f"{syntax.name} ({syntax})" if syntax is not None else "unknown (no file meta)"
        raise ValueError(f"cannot decode the pixel data of transfer syntax {name}: {type(e).__name__}: {e}. The "
                         "JPEG family needs the plugins pylibjpeg, pylibjpeg-libjpeg and pylibjpeg-openjpeg "
                         "(installed with medjax)") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    bits = int(ds.get("BitsStored", 8) or 8)
    if photometric == "PALETTE COLOR":
        return _dicom_rgb(palette_rgb(arr, ds), int(ds.RedPaletteColorLookupTableDescriptor[2]))
    if arr.ndim == 3 and arr.shape[-1] == 3:  # RGB; pydicom converts YBR to RGB by default
        return _dicom_rgb(arr, bits)
    if arr.ndim != 2:
        raise ValueError(f"expected one 2-D frame, got pixel array of shape {arr.shape}")
    arr = apply_modality_lut(arr, ds)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        arr = apply_voi_lut(arr, ds)
    lo, hi = float(arr.min()), float(arr.max())
    out = _to_uint8(arr, lo, hi)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return Image.fromarray(out, "L")


def _read_matlab_slice(path: str) -> Image.Image:
    """A Figshare brain-tumour slice (MATLAB v7.3): cjdata.image, its min-max to 0-255."""
    image = read_slice(path)[0].astype(np.float32)
    return Image.fromarray(_to_uint8(image, float(image.min()), float(image.max())), "L")


def _pillow_to_8bit(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return Image.fromarray(_to_uint8(np.clip(np.asarray(img), 0, 65535), 0, 65535), "L")
    if img.mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(img), 0, 1), "L")
    return img


def decode(path: str, channels: int, draft: int | None = None) -> Image.Image:
    """Reads an image file as an 8-bit PIL image, mode 'L' (channels=1) or 'RGB' (channels=3).

    PNG/JPEG/BMP/TIFF through Pillow; DICOM through pydicom (see `_read_dicom`: modality and VOI LUTs, then the
    image's min-max to 0-255, MONOCHROME1 inverted); MATLAB `.mat` slices of the Figshare brain-tumour set (their
    min-max to 0-255). 16-bit images are scaled by their bit depth (v / 257), not clipped at 255 as Pillow's own
    'I;16' -> 'L' conversion does. Grayscale is replicated to RGB, RGB reduced with Pillow's ITU-R 601 luma.
    draft: for a JPEG at least twice this size on both sides, decode at 1/2, 1/4 or 1/8 scale in the DCT domain
    (Pillow `draft`), keeping both sides >= draft: the loader passes its resize target (`jpeg_draft`, docs/data.md).
    Raises the underlying error (OSError, ValueError, ...) on unreadable files; the loader adds the record's origin.
    """
    if path.lower().endswith(".mat"):
        img = _read_matlab_slice(path)
    elif _is_dicom(path):
        img = _read_dicom(path)
    else:
        with Image.open(path) as f:
            if draft and f.format == "JPEG":
                f.draft(f.mode, (draft, draft))  # the file's own mode: the colour conversion stays Pillow's
            f.load()
            img = f
        img = _pillow_to_8bit(img)
    mode = "L" if channels == 1 else "RGB"
    return img if img.mode == mode else img.convert(mode)


def decode_bytes(data: bytes, channels: int) -> Image.Image:
    """An encoded PNG or JPEG (a prepared dataset's image) as an 8-bit 'L' or 'RGB' PIL image."""
    with Image.open(io.BytesIO(data)) as f:
        f.load()
        img = _pillow_to_8bit(f)
    mode = "L" if channels == 1 else "RGB"
    return img if img.mode == mode else img.convert(mode)


# ------------------------------------------------------------------------------------------------------ geometry

def resize_size(image_size: int) -> int:
    return int(round(image_size * 256 / 224))


RESIZE_MODES = ("square", "shorter")


def resize_output_size(width: int, height: int, size: int, resize: str = "square") -> tuple[int, int]:
    """(width, height) after the resize before the crop (`resize_center_crop`)."""
    if resize == "square":
        return size, size
    if resize == "shorter":
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(size * long / short)
        return (size, new_long) if width <= height else (new_long, size)
    raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")


def resize_center_crop(img: Image.Image, size: int, crop: int, resize: str = "square") -> Image.Image:
    """Resize, then torchvision's center crop to crop x crop. resize='square': to size x size, aspect not kept (the
    reference study's `Resize((size, size))`); 'shorter': the shorter side to size, aspect kept (torchvision's
    `Resize(size)`, as the glioma study: the longer side is int(size * long / short))."""
    out_w, out_h = resize_output_size(*img.size, size, resize)
    top, left = int(round((out_h - crop) / 2.0)), int(round((out_w - crop) / 2.0))
    if img.size != (out_w, out_h):  # a prepared image is stored at this size already (Pillow would copy it)
        img = img.resize((out_w, out_h), BILINEAR)
    return img.crop((left, top, left + crop, top + crop))


def random_resized_crop_params(rng: np.random.Generator, height: int, width: int, scale=(0.8, 1.2),
                               ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params with numpy draws: (top, left, height, width)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclasses.dataclass(frozen=True)
class TrainParams:
    """Every random choice of one record's train transform."""

    crop: tuple[int, int, int, int]  # RandomResizedCrop (top, left, height, width) on the center crop
    vflip: bool
    hflip: bool
    jitter: bool  # ColorJitter applied (p 0.8)
    order: tuple[int, ...]  # order of brightness (0), contrast (1), saturation (2), hue (3)
    brightness: float
    contrast: float
    saturation: float
    hue: float


def sample_train_params(rng: np.random.Generator, image_size: int) -> TrainParams:
    crop = random_resized_crop_params(rng, image_size, image_size)
    vflip, hflip, jitter = bool(rng.random() < 0.5), bool(rng.random() < 0.5), bool(rng.random() < 0.8)
    order = tuple(int(i) for i in rng.permutation(4))
    return TrainParams(crop, vflip, hflip, jitter, order, float(rng.uniform(0.8, 1.2)), float(rng.uniform(0.8, 1.2)),
                       float(rng.uniform(0.9, 1.1)), float(rng.uniform(-0.1, 0.1)))


def adjust_hue(img: Image.Image, hue: float) -> Image.Image:
    """torchvision's PIL adjust_hue: shift the HSV hue channel by hue * 255 (uint8 wrap-around); no-op on 'L'."""
    if img.mode != "RGB":
        return img
    h, s, v = img.convert("HSV").split()
    shift = np.uint8(int(hue * 255) % 256)
    with np.errstate(over="ignore"):
        h = Image.fromarray(np.asarray(h, np.uint8) + shift, "L")
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def color_jitter(img: Image.Image, p: TrainParams) -> Image.Image:
    for op in p.order:
        if op == 0:
            img = ImageEnhance.Brightness(img).enhance(p.brightness)
        elif op == 1:
            img = ImageEnhance.Contrast(img).enhance(p.contrast)
        elif op == 2 and img.mode == "RGB":
            img = ImageEnhance.Color(img).enhance(p.saturation)
        elif op == 3:
            img = adjust_hue(img, p.hue)
    return img


def train_transform(img: Image.Image, p: TrainParams, image_size: int, resize: str = "square") -> np.ndarray:
    """The reference train transform up to [0, 1]: returns uint8 (S, S, C)."""
    img = resize_center_crop(img, resize_size(image_size), image_size, resize)
    top, left, h, w = p.crop
    img = img.crop((left, top, left + w, top + h)).resize((image_size, image_size), BILINEAR)
    if p.jitter:
        img = color_jitter(img, p)
    arr = np.asarray(img)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    if p.vflip:
        arr = arr[::-1]
    if p.hflip:
        arr = arr[:, ::-1]
    return arr


def eval_transform(img: Image.Image, image_size: int, resize: str = "square") -> np.ndarray:
    """The reference eval transform up to [0, 1]: resize, center crop; returns uint8 (S, S, C)."""
    arr = np.asarray(resize_center_crop(img, resize_size(image_size), image_size, resize))
    return arr[:, :, None] if arr.ndim == 2 else arr


# ------------------------------------------------------------------------------------------------------ grain

@dataclasses.dataclass(frozen=True)
class Slot:
    """One position of a loader's stream: which record, in which epoch, and whether it is real (not padding)."""

    epoch: int
    index: int
    valid: bool = True


class RawImages:
    """Record -> 8-bit PIL image, decoded from the record's file (the raw pipeline); `draft` as in `decode`."""

    def __init__(self, channels: int, draft: int | None = None):
        self.channels, self.draft = channels, draft

    def read(self, record: Record) -> Image.Image:
        return decode(record.path, self.channels, self.draft)


class LoadAndTransform(grain.transforms.Map):
    """Slot -> {'image': uint8 (S, S, C), 'label', 'mask'}: read the record's image (`images.read(record)`: its file
    by default, or a prepared dataset's stored image) and apply the train or eval transform. Padding slots give a
    black image with mask False.

    An image that cannot be read here (it changed after the start-up check, or the check was off) never stops the
    run: it becomes a mask=False row, is logged once, appended to `failures` (this process) and, when `failure_log`
    is given, to that JSON-lines file (every process, grain workers included), which `Dataset.skipped_images` reads.
    """

    def __init__(self, records: list[Record], *, channels: int, num_classes: int, multilabel: bool,
                 image_size: int, train: bool, seed: int, failures: list | None = None,
                 failure_log: str | None = None, images=None, resize: str = "square"):
        self.records, self.channels, self.image_size, self.resize = records, channels, image_size, resize
        self.images = images if images is not None else RawImages(channels)
        self.train, self.seed = train, seed
        self.failures = failures if failures is not None else []
        self.failure_log = failure_log
        self.empty_label = np.zeros(num_classes, np.float32) if multilabel else np.int32(0)
        self.multilabel = multilabel
        self._reported: set[str] = set()
        self._lock = threading.Lock()

    def __getstate__(self):  # grain workers get a copy; the lock is rebuilt there
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _label(self, record: Record):
        return np.asarray(record.label, np.float32) if self.multilabel else np.int32(record.label)

    def _blank(self):
        return {"image": np.zeros((self.image_size, self.image_size, self.channels), np.uint8),
                "label": self.empty_label, "mask": np.bool_(False)}

    def _report(self, record: Record, reason: str) -> None:
        with self._lock:
            if record.path in self._reported:
                return
            self._reported.add(record.path)
            self.failures.append((record.path, record.origin, reason))
        log.warning("skipped unreadable image %s (%s): %s; it counts as a masked row", record.path, record.origin,
                    reason)
        if self.failure_log:
            line = json.dumps({"image": record.path, "origin": record.origin, "reason": reason}) + "\n"
            fd = os.open(self.failure_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())  # one O_APPEND write: lines of concurrent writers do not interleave
            finally:
                os.close(fd)

    def map(self, slot: Slot) -> dict:
        record = self.records[slot.index]
        if not slot.valid:
            return self._blank()
        try:
            img = self.images.read(record)
        except Exception as e:  # noqa: BLE001 - any decoder failure is reported with the file and row
            reason = "file not found" if isinstance(e, FileNotFoundError) else \
                f"cannot decode ({type(e).__name__}: {e})"
            self._report(record, reason)
            return self._blank()
        if self.train:
            rng = np.random.default_rng((self.seed, 1, slot.epoch, slot.index))
            image = train_transform(img, sample_train_params(rng, self.image_size), self.image_size, self.resize)
        else:
            image = eval_transform(img, self.image_size, self.resize)
        return {"image": image, "label": self._label(record), "mask": np.bool_(True)}


class Normalize(grain.transforms.Map):
    """uint8 image -> float32 (x / 255 - mean) / std, NHWC, computed as float32(x) * scale + offset.

    A uint8 image is mapped through a 256-entry table per channel holding exactly those float32 values: the same
    numbers as the arithmetic, in one gather per channel instead of a cast and two passes (0.29 against 0.45 ms for
    a 224 px RGB image; 0.62 ms when the image is a flipped view)."""

    def __init__(self, mean, std):
        std = np.asarray(std, np.float32)
        self.scale = (1.0 / (255.0 * std)).astype(np.float32)
        self.offset = (-np.asarray(mean, np.float32) / std).astype(np.float32)
        table = np.arange(256, dtype=np.float32)[:, None] * self.scale
        table += self.offset
        self.tables = [np.ascontiguousarray(table[:, c]) for c in range(table.shape[1])]

    def map(self, element: dict) -> dict:
        image = element["image"]
        if image.dtype == np.uint8 and image.shape[-1] == len(self.tables):
            out = np.empty(image.shape, np.float32)
            for c, table in enumerate(self.tables):
                out[..., c] = table[image[..., c]]
            return {**element, "image": out}
        image = image.astype(np.float32)
        image *= self.scale
        image += self.offset
        return {**element, "image": image}
