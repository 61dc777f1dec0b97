"""PyTorch-compatible bicubic resize (``F.interpolate(mode='bicubic', align_corners=False)``) in JAX.

Torch builds its interpolation weights in float32 for float32 inputs, and those roundings alone move the output by
a few 1e-6, so the weights here replay torch's float32 arithmetic step by step. Where its x86 CPU kernels (the
AVX2/AVX512 builds any modern x86 CPU dispatches to) fuse a multiply-add into one FMA, so do we; torch's
non-FMA ``ATEN_CPU_CAPABILITY=default`` build rounds differently (and its GPU kernels are separate code).
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
import numpy as np

_f32 = np.float32


def _fma(a, b, c):
    # float32 a * b + c with a single rounding (the product of two float32 values is exact in float64).
    return _f32(np.float64(a) * b + c)


def _keys_cubic_f32(x, a, fused_tail):
    """Keys' cubic kernel with parameter a, evaluated in float32 like torch's CPU kernels.

    The compiler fuses the last multiply-add of each polynomial in the anti-aliased path but not in the plain one.
    """
    x, a = np.abs(_f32(x)), _f32(a)
    tail = _fma if fused_tail else (lambda p, q, r: _f32(_f32(p * q) + r))
    near = tail(_f32(_fma(a + 2, x, -(a + 3)) * x), x, _f32(1))
    far = tail(_fma(_fma(a, x, -5 * a), x, 8 * a), x, -4 * a)
    return np.where(x < 1, near, np.where(x < 2, far, _f32(0)))


def bicubic_weights(in_size: int, out_size: int, scale_factor: float | None = None,
                    antialias: bool = False) -> np.ndarray:
    """(out_size, in_size) float64 matrix W so that resizing one axis is W @ x.

    Matches torch's weights for one axis of ``F.interpolate(mode='bicubic', align_corners=False)`` (float32
    inputs). ``scale_factor`` is the user's scale factor for this axis; without it the scale is in/out.
    """
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"sizes must be positive, got in_size={in_size}, out_size={out_size}")
    if scale_factor is not None and not scale_factor > 0:
        raise ValueError(f"scale_factor must be positive, got {scale_factor!r}")
    # Torch's area_pixel_compute_scale: float32(1.0 / sf) when a scale factor is given, else float32 in / out.
    scale = _f32(1.0 / scale_factor) if scale_factor is not None else _f32(in_size) / _f32(out_size)
    rows = np.arange(out_size)
    W = np.zeros((out_size, in_size))
    if not antialias:
        # Cubic convolution, A = -0.75. src = scale * (i + 0.5) - 0.5 (one FMA, no clamping at 0 for cubic);
        # taps floor(src) - 1 .. floor(src) + 2, clamped to the border (their weights pile up there).
        src = _fma(scale, rows + _f32(0.5), _f32(-0.5))
        idx = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
        t = np.clip(_f32(src - idx), _f32(0), _f32(1))
        dist = [_f32(t + 1), t, _f32(1 - t), _f32(_f32(1 - t) + 1)]
        for k in range(4):
            np.add.at(W, (rows, np.clip(idx + k - 1, 0, in_size - 1)), _keys_cubic_f32(dist[k], -0.75, False))
        return W
    if in_size == out_size:
        return np.eye(in_size)  # torch's anti-aliased kernel copies unresized axes, whatever the scale factor
    # PIL-style anti-aliased filter (torch's _upsample_bicubic2d_aa), a = -0.5, applied even when upsampling:
    # the filter is stretched by max(scale, 1) over a window of +-2 * max(scale, 1) input pixels.
    support = _f32(2 * scale) if scale >= 1 else _f32(2)
    max_taps = int(np.ceil(support)) * 2 + 1
    invscale = _f32(1.0 / np.float64(scale)) if scale >= 1 else _f32(1)
    for i in rows:
        center = _f32(np.float64(scale) * (i + 0.5))
        xmin = max(int(np.float64(_f32(center - support)) + 0.5), 0)  # int() truncates like the C++ cast
        xsize = min(max(min(int(np.float64(_f32(center + support)) + 0.5), in_size) - xmin, 0), max_taps)
        j = np.arange(xmin, xmin + xsize)
        w = _keys_cubic_f32(_f32((np.float64(_f32(j - center)) + 0.5) * invscale), -0.5, True)
        total = _f32(0)
        for v in w:  # torch normalises by a sequential float32 sum
            total = _f32(total + v)
        W[i, xmin:xmin + xsize] = _f32(w / total) if total != 0 else w
    return W


def _pair(v, name):
    t = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    if len(t) != 2:
        raise ValueError(f"{name} must be a scalar or a pair, got {v!r}")
    return t


def resize_bicubic(x, *, size=None, scale_factor=None, antialias=False, axes=(-2, -1)):
    """Resize the two spatial `axes` of x (any layout) like torch F.interpolate(mode='bicubic', align_corners=False).

    Exactly one of size (int or (h, w)) and scale_factor (float or (sh, sw)) is given. In scale-factor mode the
    output size is floor(in * sf) (as torch computes it) and the sampling grid uses the given scale factor
    (torch: scale = 1/sf), not in/out. Separable: two einsums with static numpy weight matrices at HIGHEST
    precision, computed in float32 (or x's dtype if wider) and returned in x's dtype; differentiable w.r.t. x.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"resize_bicubic expects a floating-point array, got {x.dtype}")
    if (size is None) == (scale_factor is None):
        raise ValueError("exactly one of size and scale_factor must be given")
    axes = _pair(axes, "axes")
    if not all(-x.ndim <= a < x.ndim for a in axes) or axes[0] % x.ndim == axes[1] % x.ndim:
        raise ValueError(f"axes must be two different axes of a {x.ndim}-d array, got {axes}")
    axes = tuple(a % x.ndim for a in axes)
    in_sizes = tuple(x.shape[a] for a in axes)
    if min(in_sizes) <= 0:
        raise ValueError(f"input spatial sizes must be positive, got {in_sizes}")
    if size is not None:
        out_sizes, sfs = tuple(operator.index(s) for s in _pair(size, "size")), (None, None)  # ints only
        if min(out_sizes) <= 0:
            raise ValueError(f"size must be positive, got {size!r}")
    else:
        sfs = tuple(float(s) for s in _pair(scale_factor, "scale_factor"))
        if not all(np.isfinite(s) and s > 0 for s in sfs):
            raise ValueError(f"scale_factor must be positive and finite, got {scale_factor!r}")
        out_sizes = tuple(int(np.floor(n * s)) for n, s in zip(in_sizes, sfs))
        if min(out_sizes) <= 0:
            raise ValueError(f"scale_factor {scale_factor!r} gives an empty output for input size {in_sizes}")

    dtype = jnp.promote_types(x.dtype, jnp.float32)
    y = x.astype(dtype)
    letters = "abcdefghijklmnopqrstuvwxyz"[: x.ndim]
    # Last spatial axis first, as torch's kernels do (it only changes float rounding).
    for ax, n_in, n_out, sf in reversed(list(zip(axes, in_sizes, out_sizes, sfs))):
        w = jnp.asarray(bicubic_weights(n_in, n_out, sf, antialias), dtype)
        spec = f"Z{letters[ax]},{letters}->{letters.replace(letters[ax], 'Z')}"
        y = jnp.einsum(spec, w, y, precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)
