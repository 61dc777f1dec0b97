"""Building blocks shared by the transformer backbones, written to match their PyTorch originals numerically."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn


def gelu(x):
    # PyTorch's nn.GELU is the exact erf form; flax's default is the tanh approximation.
    return nn.gelu(x, approximate=False)


def layer_norm(eps: float, name: str, dtype=None) -> nn.LayerNorm:
    # use_fast_variance=False computes E[(x - mean)^2] like torch, not E[x^2] - mean^2.
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


def rms_norm(eps: float, name: str, dtype=None) -> nn.RMSNorm:
    # x * rsqrt(mean(x^2) + eps) * scale, as torch.nn.RMSNorm
    return nn.RMSNorm(epsilon=eps, dtype=dtype, name=name)


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
        qkv = nn.Dense(3 * dim, use_bias=self.qkv_bias, dtype=self.dtype, name="qkv")(x)
        q, k, v = jnp.moveaxis(qkv.reshape(batch, tokens, 3, self.num_heads, head_dim), 2, 0)
        out = jax.nn.dot_product_attention(q, k, v)
        return nn.Dense(dim, use_bias=self.proj_bias, dtype=self.dtype, name="proj")(out.reshape(batch, tokens, dim))


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
    """fc1 -> GELU(erf) -> fc2."""

    hidden: int
    use_bias: bool = True
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        h = gelu(nn.Dense(self.hidden, use_bias=self.use_bias, dtype=self.dtype, name="fc1")(x))
        return nn.Dense(x.shape[-1], use_bias=self.use_bias, dtype=self.dtype, name="fc2")(h)


class SwiGLU(nn.Module):
    """DINOv2's fused SwiGLU: `w12` gives [gate, value], out = w3(silu(gate) * value)."""

    hidden: int
    use_bias: bool = True
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        gate, value = jnp.split(nn.Dense(2 * self.hidden, use_bias=self.use_bias, dtype=self.dtype, name="w12")(x), 2, -1)
        return nn.Dense(x.shape[-1], use_bias=self.use_bias, dtype=self.dtype, name="w3")(nn.silu(gate) * value)


def swiglu_hidden(hidden_features: int) -> int:
    """DINOv2's SwiGLU hidden size: two thirds of the MLP hidden size, rounded up to a multiple of 8."""
    return (int(hidden_features * 2 / 3) + 7) // 8 * 8
