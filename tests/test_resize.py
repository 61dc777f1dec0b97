import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medjax.resize import bicubic_weights, resize_bicubic

TOL = 1e-6

CASES = [
    pytest.param((7, 5), dict(size=(16, 11)), id="up-7x5-16x11"),
    pytest.param((37, 37), dict(size=(16, 16)), id="down-37-16"),
    pytest.param((37, 37), dict(size=16), id="down-37-int-size"),
    pytest.param((13, 9), dict(size=(4, 6)), id="down-13x9-4x6"),
    pytest.param((6, 10), dict(size=(13, 3)), id="mixed-up-down"),
    pytest.param((5, 7), dict(size=(1, 1)), id="to-1x1"),
    pytest.param((9, 9), dict(size=(9, 9)), id="identity-size"),
    pytest.param((9, 8), dict(scale_factor=1.0), id="identity-sf"),
    pytest.param((37, 37), dict(scale_factor=((16 + 0.1) / 37,) * 2), id="dinov2-37"),
    pytest.param((7, 7), dict(scale_factor=(4 + 0.1) / 7), id="dinov2-7"),
    pytest.param((23, 19), dict(scale_factor=0.37), id="sf-0.37"),
    pytest.param((11, 6), dict(scale_factor=2.3), id="sf-2.3"),
    pytest.param((6, 9), dict(scale_factor=(2.3, 0.37)), id="sf-mixed"),
    # Same output size, but the grid uses scale 1/1.05 (plain) or is copied untouched (antialias).
    pytest.param((5, 7), dict(scale_factor=1.05), id="sf-1.05-same-size"),
]


def _torch_resize(x, antialias, **kw):
    return F.interpolate(torch.from_numpy(x), mode="bicubic", align_corners=False, antialias=antialias, **kw).numpy()


def _randn(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("hw, kw", CASES)
def test_matches_torch(hw, kw, antialias):
    x = _randn((2, 3) + hw)
    want = _torch_resize(x, antialias, **kw)
    got = resize_bicubic(jnp.asarray(x), antialias=antialias, **kw)
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=TOL)


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("kw", [dict(size=(16, 11)), dict(scale_factor=(0.37, 2.3))])
def test_channel_last(kw, antialias):
    x = _randn((2, 23, 19, 3), seed=1)  # NHWC
    want = _torch_resize(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), antialias, **kw).transpose(0, 2, 3, 1)
    got = resize_bicubic(jnp.asarray(x), antialias=antialias, axes=(1, 2), **kw)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=TOL)


def test_2d_input_and_jit():
    x = _randn((13, 9), seed=2)
    want = _torch_resize(x[None, None], False, size=(20, 4))[0, 0]
    got = jax.jit(functools.partial(resize_bicubic, size=(20, 4)))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=TOL)


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("hw, kw", [((7, 5), dict(size=(16, 11))),
                                    ((37, 37), dict(scale_factor=(16 + 0.1) / 37)),
                                    ((11, 6), dict(scale_factor=(2.3, 0.6)))])
def test_grad_matches_torch(hw, kw, antialias):
    x = _randn((2, 3) + hw, seed=3)
    xt = torch.from_numpy(x).requires_grad_()
    loss = (F.interpolate(xt, mode="bicubic", align_corners=False, antialias=antialias, **kw) ** 2).sum()
    (want,) = torch.autograd.grad(loss, xt)
    got = jax.grad(lambda a: (resize_bicubic(a, antialias=antialias, **kw) ** 2).sum())(jnp.asarray(x))
    # Upsampling piles many outputs onto each input (|grad| ~ 25 here), where float32 itself (torch's float32 vs
    # float64 gradients) differs by ~1e-5, so the 1e-5 bound is relative to the largest gradient when that is > 1.
    want = want.numpy()
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("antialias", [False, True])
def test_weights(antialias):
    w = bicubic_weights(37, 16, (16 + 0.1) / 37, antialias)
    assert w.shape == (16, 37) and w.dtype == np.float64
    np.testing.assert_allclose(w.sum(1), 1, atol=1e-6)
    np.testing.assert_array_equal(bicubic_weights(5, 5, antialias=antialias), np.eye(5))


def test_low_precision_dtypes_roundtrip():
    x = jnp.asarray(_randn((1, 1, 7, 5)))
    assert resize_bicubic(x.astype(jnp.bfloat16), size=(9, 9)).dtype == jnp.bfloat16
    assert resize_bicubic(x.astype(jnp.float16), size=(9, 9)).dtype == jnp.float16


@pytest.mark.parametrize("kw, match", [
    (dict(size=4, scale_factor=0.5), "exactly one"),
    (dict(), "exactly one"),
    (dict(size=0), "size must be positive"),
    (dict(size=(4, -1)), "size must be positive"),
    (dict(size=(4, 4, 4)), "pair"),
    (dict(scale_factor=0.0), "scale_factor must be positive"),
    (dict(scale_factor=(0.5, -2.0)), "scale_factor must be positive"),
    (dict(scale_factor=0.1), "empty output"),
    (dict(size=4, axes=(1, 1)), "different axes"),
    (dict(size=4, axes=(1, 4)), "different axes"),
])
def test_argument_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        resize_bicubic(jnp.zeros((1, 1, 7, 5)), **kw)


def test_bad_inputs():
    with pytest.raises(ValueError, match="positive"):
        bicubic_weights(0, 4)
    with pytest.raises(TypeError, match="floating"):
        resize_bicubic(jnp.zeros((7, 5), jnp.int32), size=3)
