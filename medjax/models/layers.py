"""Building blocks shared by the transformer backbones, written to match their PyTorch originals numerically."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from typing import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn


def gelu(x):
    """PyTorch's nn.GELU, the exact erf form x/2 (1 + erf(x/sqrt(2))), written as PyTorch computes it (flax's
    default is the tanh approximation). flax's exact `nn.gelu(x, approximate=False)` goes through erfc, which XLA:CPU
    evaluates about 5x slower: forward + backward of ViT-B's (8, 197, 3072) activation took 290-320 ms against 64 ms
    (AMD EPYC, benchmarks/cpu_profile.py). Both stay within 1.5e-6 of PyTorch's values and gradients."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


def layer_norm(eps: float, name: str, dtype=None) -> nn.LayerNorm:
    # use_fast_variance=False computes E[(x - mean)^2] like torch, not E[x^2] - mean^2.
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


def rms_norm(eps: float, name: str, dtype=None) -> nn.RMSNorm:
    # x * rsqrt(mean(x^2) + eps) * scale, as torch.nn.RMSNorm
    return nn.RMSNorm(epsilon=eps, dtype=dtype, name=name)


# ------------------------------------------------------------------------------------------------ matmuls


def cpu_bf16(dtype) -> bool:
    """bfloat16 compute on XLA:CPU, where a bf16 x bf16 matmul runs natively (~2x float32, AVX512-BF16/AMX) only when
    it accumulates into float32 (preferred_element_type); a bf16-output matmul is upcast to a float32 GEMM."""
    return dtype is not None and jnp.dtype(dtype) == jnp.bfloat16 and jax.default_backend() == "cpu"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def bf16_einsum(spec: str, a, b, out_dtype):
    """einsum(spec, a, b) of bfloat16 operands, accumulated in float32 and returned as `out_dtype`; the two backward
    matmuls take the cotangent in bfloat16 and accumulate in float32 too. The values are those of a plain bf16
    einsum (XLA:CPU accumulates it in float32 as well); only the GEMM kernel changes."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(out_dtype)


def _bf16_einsum_fwd(spec, a, b, out_dtype):
    return bf16_einsum(spec, a, b, out_dtype), (a, b)


def _bf16_einsum_bwd(spec, out_dtype, residuals, g):
    a, b = residuals
    inputs, out = spec.split("->")
    sa, sb = inputs.split(",")
    g = g.astype(jnp.bfloat16)
    da = jnp.einsum(f"{out},{sb}->{sa}", g, b, preferred_element_type=jnp.float32).astype(a.dtype)
    db = jnp.einsum(f"{sa},{out}->{sb}", a, g, preferred_element_type=jnp.float32).astype(b.dtype)
    return da, db


bf16_einsum.defvjp(_bf16_einsum_fwd, _bf16_einsum_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """nn.Dense's matmul: `bf16_einsum` for bfloat16 compute on CPU, lax.dot_general everywhere else."""
    standard = dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())) and rhs.ndim == 2
    if standard and preferred_element_type is None and lhs.dtype == rhs.dtype and cpu_bf16(lhs.dtype):
        return bf16_einsum("...k,kn->...n", lhs, rhs, jnp.bfloat16)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)


def dense(features: int, use_bias: bool = True, dtype=None, name: str | None = None) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, dot_general=dense_dot_general, name=name)


class LayerScale(nn.Module):
    """Per-channel scale (`gamma`), DINOv2's `ls1`/`ls2`."""

    @nn.compact
    def __call__(self, x):
        gamma = self.param("gamma", nn.initializers.constant(1.0), (x.shape[-1],))
        return x * gamma.astype(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (rows q, k, v, head-major inside each)."""

    num_heads: int
    qkv_bias: bool = True
    proj_bias: bool = True
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        qkv = dense(3 * dim, self.qkv_bias, self.dtype, "qkv")(x)
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
        out = cudnn_attention(qkv) if use_cudnn_attention(qkv.dtype, head_dim) else None
        if out is None:
            q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))  # (3, batch, heads, tokens, head_dim)
            out = jnp.transpose(head_major_attention(q, k, v), (0, 2, 1, 3))
        return dense(dim, self.proj_bias, self.dtype, "proj")(out.reshape(batch, tokens, dim))


def use_cudnn_attention(dtype, head_dim: int) -> bool:
    """cuDNN's fused (flash) attention: on GPU, for half-precision compute and the head sizes it supports. Elsewhere,
    and in float32, XLA's attention runs (`head_major_attention`)."""
    return (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            and head_dim % 8 == 0 and head_dim <= 128)


def cudnn_attention(qkv):
    """cuDNN's fused attention of a (batch, tokens, 3, heads, head_dim) qkv, or None where cuDNN refuses the shapes or
    is not available (jax raises while tracing): the caller then runs XLA's attention, and the reason is logged once."""
    q, k, v = jnp.moveaxis(qkv, 2, 0)
    try:
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    except (RuntimeError, ValueError, NotImplementedError) as e:
        _warn_once(f"cuDNN attention unavailable for q/k/v of shape {q.shape} {q.dtype} ({type(e).__name__}: {e}); "
                   "using XLA's attention")
        return None


@functools.lru_cache(maxsize=None)
def _warn_once(message: str):
    logging.getLogger(__name__).warning(message)


def head_major_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v on (batch, heads, tokens, head_dim) arrays, the math of jax.nn.dot_product_attention's
    XLA path (float32 scores and softmax) with the heads outside the token axis: the batched matmuls then need no
    transposes, ~1.3x faster forward + backward on CPU than the (batch, tokens, heads, head_dim) layout."""
    if cpu_bf16(q.dtype):
        scores = bf16_einsum("bnqh,bnkh->bnqk", q, k, jnp.float32)
    else:
        scores = jnp.einsum("bnqh,bnkh->bnqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores * jnp.float32(q.shape[-1] ** -0.5), axis=-1).astype(v.dtype)
    if cpu_bf16(v.dtype):
        return bf16_einsum("bnqk,bnkh->bnqh", probs, v, v.dtype)
    return jnp.einsum("bnqk,bnkh->bnqh", probs, v)


class AttentionalPooler(nn.Module):
    """open_clip's CoCa pooler: learned queries attend to the (ln_k-normed) tokens with nn.MultiheadAttention
    semantics (separate q/k/v projections since the token width may differ from the query width)."""

    dim: int
    num_heads: int
    num_queries: int
    eps: float
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        batch = x.shape[0]
        query = self.param("query", nn.initializers.normal(0.02), (self.num_queries, self.dim))
        x = layer_norm(self.eps, "ln_k", self.dtype)(x)
        q = layer_norm(self.eps, "ln_q", self.dtype)(query)
        head = self.dim // self.num_heads
        q = nn.Dense(self.dim, dtype=self.dtype, name="q_proj")(q).reshape(1, self.num_queries, self.num_heads, head)
        k = nn.Dense(self.dim, dtype=self.dtype, name="k_proj")(x).reshape(batch, -1, self.num_heads, head)
        v = nn.Dense(self.dim, dtype=self.dtype, name="v_proj")(x).reshape(batch, -1, self.num_heads, head)
        out = jax.nn.dot_product_attention(jnp.broadcast_to(q, (batch, *q.shape[1:])), k, v)
        return nn.Dense(self.dim, dtype=self.dtype, name="out_proj")(out.reshape(batch, self.num_queries, self.dim))


class Mlp(nn.Module):
    """fc1 -> act -> fc2; `act` the exact-erf GELU unless told (OpenAI CLIP's `quick_gelu`, SigLIP's tanh GELU)."""

    hidden: int
    use_bias: bool = True
    dtype: jnp.dtype | None = None
    act: Callable = gelu

    @nn.compact
    def __call__(self, x):
        h = self.act(dense(self.hidden, self.use_bias, self.dtype, "fc1")(x))
        return dense(x.shape[-1], self.use_bias, self.dtype, "fc2")(h)


class SwiGLU(nn.Module):
    """DINOv2's fused SwiGLU: `w12` gives [gate, value], out = w3(silu(gate) * value)."""

    hidden: int
    use_bias: bool = True
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        gate, value = jnp.split(dense(2 * self.hidden, self.use_bias, self.dtype, "w12")(x), 2, -1)
        return dense(x.shape[-1], self.use_bias, self.dtype, "w3")(nn.silu(gate) * value)


def swiglu_hidden(hidden_features: int) -> int:
    """DINOv2's SwiGLU hidden size: two thirds of the MLP hidden size, rounded up to a multiple of 8."""
    return (int(hidden_features * 2 / 3) + 7) // 8 * 8


# ------------------------------------------------------------------------------------------------ BatchNorm

_FROZEN_NORMS: contextvars.ContextVar = contextvars.ContextVar("medjax_frozen_norms", default=frozenset())


@contextlib.contextmanager
def frozen_norms(paths):
    """Inside this context (entered by the engine around `model.apply`, so it holds while jax traces the step), the
    BatchNorms at these module paths (`backbone/layer1_0/bn1`) are frozen: they normalise with their stored statistics
    and never update them, whatever `train` says."""
    token = _FROZEN_NORMS.set(frozenset(paths))
    try:
        yield
    finally:
        _FROZEN_NORMS.reset(token)


class BatchNorm(nn.Module):
    """torch.nn.BatchNorm2d / 1d over the last axis, with PyTorch's semantics.

    train=True: normalise with the batch mean and biased variance, and update the running statistics as
    (1 - momentum) * running + momentum * batch, the variance unbiased (n / (n - 1)), momentum 0.1. train=False, or
    a BatchNorm listed in `frozen_norms`: normalise with the running statistics, which stay bitwise unchanged. The
    statistics live in the `batch_stats` collection as `mean` and `var` (torch's running_mean / running_var).
    Under jit on a sharded batch the statistics are those of the global batch (SyncBatchNorm)."""

    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        frozen = "/".join(self.scope.path) in _FROZEN_NORMS.get()
        if train and not frozen and not self.is_initializing():
            axes = tuple(range(x.ndim - 1))
            x32 = x.astype(jnp.float32)
            mean = x32.mean(axes)
            var = jnp.square(x32 - mean).mean(axes)
            n = x32.size // features
            ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
            ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * var * (n / max(n - 1, 1))
        else:
            mean, var = ra_mean.value, ra_var.value
        inv = jax.lax.rsqrt(var + self.epsilon) * scale
        dtype = self.dtype or x.dtype
        return (x.astype(jnp.float32) - mean) * inv + bias if dtype == jnp.float32 else \
            ((x - mean.astype(dtype)) * inv.astype(dtype) + bias.astype(dtype))


# ------------------------------------------------------------------------------------------------ CLIP's activation


def quick_gelu(x):
    """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x) (transformers' `quick_gelu`, open_clip's QuickGELU)."""
    return x * jax.nn.sigmoid(1.702 * x)


# ------------------------------------------------------------------------------------------------ windows, inputs


def window_partition(x, window: int):
    """(B, H, W, C) -> (B * nH * nW, window, window, C), zero-padding bottom/right to a multiple of the window
    (SAM's and Hiera's window attention)."""
    b, h, w, c = x.shape
    ph, pw = -h % window, -w % window
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    nh, nw = (h + ph) // window, (w + pw) // window
    x = x.reshape(b, nh, window, nw, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b * nh * nw, window, window, c), (nh, nw)


def window_unpartition(windows, batch: int, counts: tuple[int, int], hw: tuple[int, int]):
    """Inverse of window_partition: (B * nH * nW, w, w, C) -> (B, H, W, C), padding cropped."""
    nh, nw = counts
    _, window, _, c = windows.shape
    x = windows.reshape(batch, nh, nw, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, nh * window, nw * window, c)[:, :hw[0], :hw[1]]


def patch_embed(images, config, dtype, use_bias: bool = True):
    """The ViT families' patch embedding `patch_embed`: a (p, p) convolution of stride p over NHWC images, "VALID" as
    upstream's strided conv (a remainder below one patch is cropped), returned as tokens (B, gh * gw, width) with the
    grid (gh, gw). An input smaller than one patch is refused."""
    p, (height, width) = config.patch_size, images.shape[1:3]
    if height < p or width < p:
        raise ValueError(f"{config.family}: input {height}x{width} px is smaller than the patch size {p}")
    x = nn.Conv(config.width, (p, p), strides=(p, p), padding="VALID", use_bias=use_bias, dtype=dtype,
                name="patch_embed")(images)
    return x.reshape(x.shape[0], -1, config.width), x.shape[1:3]


def image_shape(images, config) -> tuple[int, int, int]:
    """(batch, height, width) of NHWC images, which must have the backbone's input channels."""
    if images.ndim != 4 or images.shape[-1] != config.in_chans:
        raise ValueError(f"{config.family}: expected NHWC images with {config.in_chans} channels, got shape "
                         f"{tuple(images.shape)}")
    return tuple(images.shape[:3])
