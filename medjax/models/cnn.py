"""Layers the torchvision CNN ports share (ResNet, DenseNet, VGG), written to match torch's numerics.

Padding is always explicit and symmetric, as torch's `padding=p` is: XLA's "SAME" pads the extra row of an even
kernel or a strided window at the end, torch never does.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from medjax.models.layers import BatchNorm


def conv(features: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1, groups: int = 1,
         bias: bool = False, dtype=None, name: str | None = None) -> nn.Conv:
    """torch.nn.Conv2d(…, kernel, stride, padding, dilation, groups, bias) on NHWC; kernel HWIO (I = in / groups)."""
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((padding, padding),) * 2,
                   kernel_dilation=(dilation, dilation), feature_group_count=groups, use_bias=bias, dtype=dtype,
                   name=name)


def batch_norm(dtype=None, name: str | None = None) -> BatchNorm:
    """torch.nn.BatchNorm2d defaults: eps 1e-5, momentum 0.1."""
    return BatchNorm(momentum=0.1, epsilon=1e-5, dtype=dtype, name=name)


def max_pool(x, kernel: int, stride: int, padding: int = 0):
    """torch.nn.MaxPool2d(kernel, stride, padding), floor mode: the padding is -inf, never a maximum."""
    return nn.max_pool(x, (kernel, kernel), (stride, stride), ((padding, padding),) * 2)


def avg_pool(x, kernel: int, stride: int):
    """torch.nn.AvgPool2d(kernel, stride) without padding, floor mode (an odd map loses its last row/column)."""
    return nn.avg_pool(x, (kernel, kernel), (stride, stride), "VALID")


def adaptive_windows(size: int, out: int) -> list[tuple[int, int]]:
    """torch's adaptive pooling windows: [floor(i * size / out), ceil((i + 1) * size / out)) for i < out."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def adaptive_avg_pool(x, out: int):
    """torch.nn.AdaptiveAvgPool2d(out) on NHWC. Each output averages its (possibly overlapping) window, separably over
    H and W, so a map smaller than `out` is not simply replicated: windows straddling two cells average them."""
    _, height, width, _ = x.shape
    if min(height, width) < 1:
        raise ValueError(f"adaptive pooling of an empty {height}x{width} map: the input image is too small")
    if (height, width) == (out, out):
        return x

    def matrix(size):
        m = np.zeros((out, size), np.float32)
        for i, (start, end) in enumerate(adaptive_windows(size, out)):
            m[i, start:end] = 1.0 / (end - start)
        return jnp.asarray(m, x.dtype)

    return jnp.einsum("ih,bhwc,jw->bijc", matrix(height), x, matrix(width))


def tokens(x):
    """(B, H, W, C) feature map -> (B, H*W, C) tokens, row-major (the attention head's input)."""
    batch, height, width, channels = x.shape
    return x.reshape(batch, height * width, channels)


