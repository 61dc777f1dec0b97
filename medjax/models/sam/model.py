"""The SAM v1 image encoder (`segment_anything.modeling.ImageEncoderViT`, the ViT-B/L/H of `sam_vit_{b,l,h}_*.pth`;
transformers' `SamVisionEncoder`): a plain ViT on a 2-d token map with windowed and global attention, decomposed
relative positions, and a conv neck.

- Tokens stay NHWC (B, H/16, W/16, D) throughout, as upstream. Windowed blocks zero-pad the NORMED map at the bottom /
  right to a multiple of the window and attend within each window with no mask (padded tokens take part).
- Attention adds MViTv2's decomposed relative positions, computed from the UNSCALED q: rel_h[q, k] = q . Rh[qh - kh]
  and rel_w likewise, tables of length 2w - 1 (windowed) or 2g - 1 (global, g = the built grid); a table is linearly
  resized (torch `F.interpolate(mode='linear')`) when the attended size differs, as upstream's `get_rel_pos` does.
- The absolute pos-embed is stored for the built grid (64x64 at 1024 px). At another input size medjax resizes it
  (bicubic, size-based, no antialias, torch semantics) at every forward; upstream cannot run there (its add fails).
- Neck: 1x1 conv -> LayerNorm2d -> 3x3 conv -> LayerNorm2d (LayerNorm over channels per position, eps 1e-6), no biases.

Outputs: `trunk_tokens` (B, h, w, D), the last block's output before the neck; `pooled`, their mean over positions
(the radiology study's SAM feature, = `linear_head_input`); `image_embeddings`, the neck output NCHW (B, out, h, w);
`debug_neck_pooled`, its mean over positions; `attention_head_input`, the trunk tokens row-major (B, h*w, D).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from medjax.models.base import Backbone, ConfigMixin
from medjax.models.layers import Mlp, dense, layer_norm, patch_embed, window_partition, window_unpartition
from medjax.resize import resize_bicubic

FAMILY = "sam_vit"


@dataclasses.dataclass(frozen=True)
class SamViTConfig(ConfigMixin):
    family: str
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    patch_size: int = 16
    pos_grid: tuple[int, int] = (64, 64)  # img_size // patch_size: the stored pos-embed and the global rel-pos tables
    mlp_hidden: int = 3072
    out_chans: int = 256
    in_chans: int = 3
    qkv_bias: bool = True
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    window_size: int = 14  # 0: every block global
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    norm_eps: float = 1e-6  # the blocks' LayerNorms (build_sam passes 1e-6; the neck's LayerNorm2d is always 1e-6)
    remat: bool = False  # model.remat: recompute each block in the backward pass (activation memory of ~one block)

    def __post_init__(self):
        object.__setattr__(self, "pos_grid", tuple(int(g) for g in self.pos_grid))
        object.__setattr__(self, "global_attn_indexes", tuple(int(i) for i in self.global_attn_indexes))
        problems = []
        if self.family != FAMILY:
            problems.append(f"family must be {FAMILY!r}, got {self.family!r}")
        if self.width % self.num_heads:
            problems.append(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.window_size < 0:
            problems.append(f"window_size {self.window_size} < 0")
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.depth]
        if bad:
            problems.append(f"global_attn_indexes {bad} are not blocks of a depth-{self.depth} encoder")
        if problems:
            raise ValueError("SamViTConfig: " + "; ".join(problems))

    @property
    def image_size(self) -> tuple[int, int]:
        """The input size of the stored pos-embed (1024x1024 for the released models)."""
        return self.pos_grid[0] * self.patch_size, self.pos_grid[1] * self.patch_size

    def window_of(self, block: int) -> int:
        """The attention window of a block; 0 for a global one."""
        return 0 if block in self.global_attn_indexes else self.window_size


# ------------------------------------------------------------------------------------------------ relative positions


@functools.lru_cache(maxsize=None)
def linear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of torch `F.interpolate(mode='linear', align_corners=False)` along one axis (size-based, no
    scale given). The source index replays torch's float32 arithmetic: scale = in / out in float32, then
    scale * (dst + 0.5) - 0.5 as one fused multiply-add (rounded once), clamped at 0."""
    scale = np.float32(in_size) / np.float32(out_size)
    m = np.zeros((out_size, in_size), np.float64)
    for dst in range(out_size):
        src = max(np.float32(np.float64(scale) * (dst + 0.5) - 0.5), np.float32(0.0))
        i0 = int(src)
        i1 = i0 + (1 if i0 < in_size - 1 else 0)
        lam = float(np.float32(src - np.float32(i0)))
        m[dst, i0] += 1.0 - lam
        m[dst, i1] += lam
    return m.astype(np.float32)


@functools.lru_cache(maxsize=None)
def rel_pos_index(q_size: int, k_size: int) -> np.ndarray:
    """(q, k) rows of the (2 * max(q, k) - 1)-long table for each query / key position (upstream's `get_rel_pos`,
    including its coordinate scaling when q and k differ in length)."""
    q = np.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k = np.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    return ((q - k) + (k_size - 1) * max(q_size / k_size, 1.0)).astype(np.int64)


def get_rel_pos(q_size: int, k_size: int, table):
    """(q, k, C) relative-position embeddings from a (L, C) table, linearly resized when L != 2 * max(q, k) - 1."""
    length = 2 * max(q_size, k_size) - 1
    if table.shape[0] != length:
        table = jnp.einsum("ol,lc->oc", linear_resize_matrix(table.shape[0], length), table.astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST).astype(table.dtype)
    return table[rel_pos_index(q_size, k_size)]


# ------------------------------------------------------------------------------------------------ windows


# ------------------------------------------------------------------------------------------------ modules


class SamAttention(nn.Module):
    """Multi-head attention over a (B, H, W, D) map (fused qkv: rows q, k, v, head-major) with decomposed relative
    positions; `table` is the (h, w) the rel-pos tables are stored for (the window, or the built grid)."""

    config: SamViTConfig
    table: tuple[int, int]
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        c = self.config
        b, h, w, d = x.shape
        heads, hd = c.num_heads, d // c.num_heads
        qkv = dense(3 * d, c.qkv_bias, self.dtype, "qkv")(x).reshape(b, h * w, 3, heads, hd)
        q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))  # (B, heads, N, hd)
        scores = jnp.einsum("bnqc,bnkc->bnqk", q * jnp.asarray(hd ** -0.5, q.dtype), k,
                            preferred_element_type=jnp.float32)
        if c.use_rel_pos:
            init = nn.initializers.zeros  # upstream creates the tables as zeros (rel_pos_zero_init is ignored)
            table_h = self.param("rel_pos_h", init, (2 * self.table[0] - 1, hd))
            table_w = self.param("rel_pos_w", init, (2 * self.table[1] - 1, hd))
            rh, rw = get_rel_pos(h, h, table_h).astype(q.dtype), get_rel_pos(w, w, table_w).astype(q.dtype)
            rq = q.reshape(b, heads, h, w, hd)
            rel_h = jnp.einsum("bnhwc,hkc->bnhwk", rq, rh, preferred_element_type=jnp.float32)
            rel_w = jnp.einsum("bnhwc,wkc->bnhwk", rq, rw, preferred_element_type=jnp.float32)
            scores = scores.reshape(b, heads, h, w, h, w) + rel_h[..., :, None] + rel_w[..., None, :]
            scores = scores.reshape(b, heads, h * w, h * w)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bnqk,bnkc->bqnc", probs, v).reshape(b, h, w, d)
        return dense(d, True, self.dtype, "proj")(out)


class SamBlock(nn.Module):
    config: SamViTConfig
    window: int  # 0: global attention
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        c = self.config
        batch, h, w, _ = x.shape
        y = layer_norm(c.norm_eps, "norm1", self.dtype)(x)
        if self.window:
            y, counts = window_partition(y, self.window)
        table = (self.window, self.window) if self.window else c.pos_grid
        y = SamAttention(c, table, self.dtype, name="attn")(y)
        if self.window:
            y = window_unpartition(y, batch, counts, (h, w))
        x = x + y
        return x + Mlp(c.mlp_hidden, True, self.dtype, name="mlp")(layer_norm(c.norm_eps, "norm2", self.dtype)(x))


class SamNeck(nn.Module):
    """Conv2d(D, out, 1) -> LayerNorm2d -> Conv2d(out, out, 3, padding 1) -> LayerNorm2d, no biases (NHWC)."""

    out_chans: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.out_chans, (1, 1), use_bias=False, dtype=self.dtype, name="conv1")(x)
        x = layer_norm(1e-6, "norm1", self.dtype)(x)  # LayerNorm2d: over channels at each position
        x = nn.Conv(self.out_chans, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=self.dtype,
                    name="conv2")(x)
        return layer_norm(1e-6, "norm2", self.dtype)(x)


def resize_pos_embed(pos_embed, grid: tuple[int, int]):
    """The stored (1, g, g, D) pos-embed at another token grid: bicubic, size-based, no antialias (torch
    `F.interpolate(mode='bicubic', align_corners=False)`). A medjax extension: upstream SAM has no resize."""
    if tuple(pos_embed.shape[1:3]) == tuple(grid):
        return pos_embed
    return resize_bicubic(pos_embed.astype(jnp.float32), size=grid, axes=(1, 2)).astype(pos_embed.dtype)


class SamImageEncoder(Backbone):
    """`ImageEncoderViT`; see the module docstring for the outputs."""

    @nn.compact
    def forward(self, images, train):
        c = self.config
        tokens, grid = patch_embed(images, c, self.dtype)  # floor(H / p), floor(W / p), as upstream's strided conv
        batch = tokens.shape[0]
        x = tokens.reshape(batch, *grid, c.width)  # the blocks work on the NHWC map
        if c.use_abs_pos:
            pos_embed = self.param("pos_embed", nn.initializers.zeros, (1, *c.pos_grid, c.width))
            x = x + resize_pos_embed(pos_embed, grid).astype(x.dtype)
        block = nn.remat(SamBlock) if c.remat else SamBlock
        for i in range(c.depth):
            x = block(c, c.window_of(i), self.dtype, name=f"blocks_{i}")(x)
        neck = SamNeck(c.out_chans, self.dtype, name="neck")(x)
        tokens = x.reshape(batch, -1, c.width)
        pooled = tokens.mean(axis=1)
        return {"trunk_tokens": x, "pooled": pooled, "image_embeddings": jnp.transpose(neck, (0, 3, 1, 2)),
                "debug_neck_pooled": neck.mean(axis=(1, 2)), "linear_head_input": pooled,
                "attention_head_input": tokens}


# ------------------------------------------------------------------------------------------------ contract facts


def layers(config: SamViTConfig) -> list[str]:
    """The patch embedding and absolute pos-embed, then `blocks_0` ...; the neck comes after."""
    return [r"(patch_embed|pos_embed)(/|$)"] + [f"blocks_{i}/" for i in range(config.depth)]


def lora_targets(config: SamViTConfig) -> list[str]:
    """The qkv and MLP (lin1 / lin2 upstream) kernels of every block."""
    return [r"blocks_\d+/(attn/qkv|mlp/(fc1|fc2))/kernel$"]
