"""Decode and the train/eval transforms against the same operations done step by step with PIL (torchvision's
PIL semantics), to 1 grey level."""

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from medjax.data import fake, transforms

BILINEAR = Image.Resampling.BILINEAR


def _photo(mode, size=(300, 260), seed=0):
    rng = np.random.default_rng(seed)
    img = fake.class_image(rng, size[1], size[0], 1 if mode == "L" else 3, 2, 5)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8).squeeze())


def _pil_hue(img, factor):  # torchvision.transforms.functional_pil.adjust_hue
    if img.mode in {"L", "1", "I", "F"}:
        return img
    h, s, v = img.convert("HSV").split()
    np_h = np.array(h, dtype=np.uint8)
    with np.errstate(over="ignore"):
        np_h += np.int8(factor * 255).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert(img.mode)


def _pil_train(img, p, size):
    """The reference chain, one PIL operation per step, as torchvision applies it to PIL images."""
    resize = round(size * 256 / 224)
    img = img.resize((resize, resize), BILINEAR)
    top = int(round((resize - size) / 2.0))
    img = img.crop((top, top, top + size, top + size))  # CenterCrop
    i, j, h, w = p.crop
    img = img.crop((j, i, j + w, i + h)).resize((size, size), BILINEAR)  # RandomResizedCrop
    if p.vflip:
        img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if p.hflip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if p.jitter:
        ops = [lambda x: ImageEnhance.Brightness(x).enhance(p.brightness),
               lambda x: ImageEnhance.Contrast(x).enhance(p.contrast),
               lambda x: ImageEnhance.Color(x).enhance(p.saturation),
               lambda x: _pil_hue(x, p.hue)]
        for k in p.order:
            img = ops[k](img)
    arr = np.asarray(img)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _max_diff(a, b):
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_eval_transform_matches_pil(mode):
    img = _photo(mode)
    ref = img.resize((256, 256), BILINEAR).crop((16, 16, 240, 240))
    ref = np.asarray(ref)
    ours = transforms.eval_transform(img, 224)
    assert ours.shape == (224, 224, 3 if mode == "RGB" else 1)
    assert _max_diff(ours.reshape(ref.shape), ref) <= 1


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_train_transform_matches_pil(mode):
    img = _photo(mode, seed=1)
    seen = set()
    for seed in range(12):
        p = transforms.sample_train_params(np.random.default_rng(seed), 224)
        seen |= {("v", p.vflip), ("h", p.hflip), ("j", p.jitter)}
        ours = transforms.train_transform(img, p, 224)
        assert ours.shape == (224, 224, 3 if mode == "RGB" else 1)
        assert _max_diff(ours, _pil_train(img, p, 224)) <= 1, p
    assert len(seen) == 6  # both outcomes of each flip and of the jitter were exercised


def test_other_output_size_and_small_sources():
    img = _photo("RGB", size=(40, 30))
    p = transforms.sample_train_params(np.random.default_rng(0), 32)
    assert transforms.resize_size(32) == 37
    assert _max_diff(transforms.train_transform(img, p, 32), _pil_train(img, p, 32)) <= 1


def test_random_resized_crop_params():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = transforms.random_resized_crop_params(rng, 224, 224)
        assert 0 <= top and top + h <= 224 and 0 <= left and left + w <= 224
        assert 0.8 * 224 * 224 * 0.99 <= h * w <= 224 * 224
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    # no valid crop in 10 tries (scale > 1): torchvision's fallback, the whole (square) image
    assert transforms.random_resized_crop_params(rng, 224, 224, scale=(1.5, 1.6)) == (0, 0, 224, 224)
    assert transforms.random_resized_crop_params(rng, 100, 300, scale=(5, 6)) == (0, 83, 100, 133)


def test_train_params_are_a_function_of_seed_epoch_index():
    a = transforms.sample_train_params(np.random.default_rng((0, 1, 2, 3)), 224)
    assert a == transforms.sample_train_params(np.random.default_rng((0, 1, 2, 3)), 224)
    others = {transforms.sample_train_params(np.random.default_rng(k), 224) for k in
              [(1, 1, 2, 3), (0, 1, 3, 3), (0, 1, 2, 4)]}
    assert a not in others


def test_decode_modes(tmp_path):
    ramp = (np.arange(64 * 48, dtype=np.float64).reshape(48, 64) % 256)[..., None]
    path16 = str(tmp_path / "sixteen.png")
    fake._save_png16(ramp, path16)  # values v * 257, mode I;16
    assert Image.open(path16).mode == "I;16"
    got = np.asarray(transforms.decode(path16, 1))
    np.testing.assert_array_equal(got, ramp[..., 0].astype(np.uint8))  # scaled by bit depth, not clipped at 255
    rgb = transforms.decode(path16, 3)
    assert rgb.mode == "RGB" and np.array_equal(np.asarray(rgb)[..., 1], got)

    color = tmp_path / "color.jpg"
    Image.new("RGB", (8, 8), (200, 100, 50)).save(color, quality=100)
    gray = np.asarray(transforms.decode(str(color), 1))
    assert gray.shape == (8, 8) and abs(int(gray[0, 0]) - round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)) <= 2


def test_decode_dicom(tmp_path):
    import pydicom

    img = np.linspace(10, 200, 12 * 10).reshape(12, 10, 1)
    path = str(tmp_path / "a.dcm")
    fake.save_dicom(img, path)
    got = np.asarray(transforms.decode(path, 1)).astype(int)
    expected = np.rint((img[..., 0] - img.min()) / (img.max() - img.min()) * 255)  # min-max to 0-255
    assert np.abs(got - expected).max() <= 1
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "MONOCHROME1"  # 0 is white
    ds.save_as(path)
    inverted = np.asarray(transforms.decode(path, 1)).astype(int)
    np.testing.assert_array_equal(inverted, 255 - got)
    no_ext = tmp_path / "image_without_extension"
    no_ext.write_bytes(open(path, "rb").read())  # recognised by the DICM magic
    assert np.asarray(transforms.decode(str(no_ext), 3)).shape == (12, 10, 3)


def test_normalize():
    norm = transforms.Normalize((0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    out = norm.map({"image": np.array([[[0, 255, 51]]], np.uint8), "mask": True})["image"]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], [-1.0, 3.0, 0.2], rtol=1e-6)


@pytest.mark.parametrize("channels", [3, 1])
def test_normalize_tables_give_the_arithmetic_values_bit_for_bit(channels):
    """The per-channel tables of Normalize hold float32(x) * scale + offset: the same float32 numbers as the cast and
    two passes it replaced, for every uint8 value, on flipped views and on a batch; and (x / 255 - mean) / std in
    float64 within float32 rounding."""
    rng = np.random.default_rng(3)
    mean, std = tuple(rng.uniform(0.1, 0.6, channels)), tuple(rng.uniform(0.05, 0.3, channels))
    norm = transforms.Normalize(mean, std)
    values = np.arange(256, dtype=np.uint8)
    image = np.stack([np.roll(values, 7 * c) for c in range(channels)], -1).reshape(16, 16, channels)
    for x in (image, image[::-1, ::-1], np.stack([image, image[::-1]])):
        got = norm.map({"image": x})["image"]
        scale = np.float32(1) / (np.float32(255) * np.asarray(std, np.float32))
        offset = -np.asarray(mean, np.float32) / np.asarray(std, np.float32)
        before = x.astype(np.float32)
        before *= scale.astype(np.float32)
        before += offset.astype(np.float32)
        assert got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, before)
        np.testing.assert_allclose(got, (x / 255.0 - np.asarray(mean)) / np.asarray(std), rtol=1e-5, atol=1e-5)


def test_shorter_side_resize_is_torchvisions_resize_then_center_crop():
    """resize='shorter' is torchvision's Resize(256) (shorter side 256, longer int(256 * long / short)) then
    CenterCrop(224) (top/left int(round((size - 224) / 2))), as the glioma study transforms; sizes worked out by hand
    from torchvision's rules."""
    from PIL import Image

    from medjax.data.transforms import eval_transform

    rng = np.random.default_rng(0)
    for (w, h), (new_w, new_h), (left, top) in [((300, 200), (384, 256), (80, 16)),   # landscape
                                                ((201, 333), (256, 424), (16, 100)),  # portrait, 424.1 -> 424
                                                ((250, 250), (256, 256), (16, 16))]:  # square: as 'square'
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        expected = np.asarray(img.resize((new_w, new_h), Image.BILINEAR).crop((left, top, left + 224, top + 224)))
        assert np.array_equal(eval_transform(img, 224, "shorter"), expected), (w, h)
    square = Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8))
    assert np.array_equal(eval_transform(square, 224, "square"),
                          np.asarray(square.resize((256, 256), Image.BILINEAR).crop((16, 16, 240, 240))))
