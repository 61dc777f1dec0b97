"""The SAM 2.1 image encoder: a Hiera trunk with windowed attention and an FPN neck (family `sam2_hiera`).

Written from the description of facebookresearch/sam2 (`hieradet.Hiera`, `image_encoder.ImageEncoder` / `FpnNeck`)
and checked against it and against transformers' `Sam2VisionModel`. Numerics that must match upstream:

- patch embed Conv(k7, s4, p3); pos-embed = torch bicubic (size-based, A=-0.75, no antialias) resize of the
  background embed to the patch grid + the first-stage window embed tiled over the grid (the grid must be a multiple
  of that window);
- each block: `xn = LayerNorm(x)` (eps 1e-6); at a width change the shortcut is `maxpool(Linear(xn))`; `xn` is
  zero-padded bottom/right to a multiple of the window (no attention mask: padded tokens take part with q = k = v =
  the qkv bias); at the q-pool blocks q is 2x2-max-pooled inside each window; the first block of a stage still uses
  the previous stage's window (the lag); blocks in `global_att_blocks` attend globally;
- the FPN neck: 1x1 lateral convs, a nearest (pixel-repeat) 2x top-down path into `fpn_top_down_levels` only, no
  output conv or norm; `scalp` drops the coarsest levels and `vision_features` is the coarsest level left (stride 16
  for SAM 2.1).

Input is NHWC float. Outputs are NCHW like upstream's, plus `linear_head_input` (mean of `vision_features` over
positions) and `attention_head_input` (its positions as row-major tokens).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from medjax.models.base import Backbone, ConfigMixin, Part
from medjax.models.layers import Mlp, layer_norm, window_partition, window_unpartition
from medjax.resize import resize_bicubic

FAMILY = "sam2_hiera"
NUM_STAGES = 4


@dataclasses.dataclass(frozen=True)
class HieraConfig(ConfigMixin):
    """A Hiera trunk + FPN neck. Per-stage tuples list the 4 stages from fine (stride 4) to coarse (stride 32)."""

    family: Literal["sam2_hiera"]
    embed_dims: tuple[int, ...]  # width of each stage (upstream: embed_dim * dim_mul**s)
    num_heads: tuple[int, ...]  # heads of each stage (upstream: num_heads * head_mul**s)
    stages: tuple[int, ...]  # blocks per stage
    window_spec: tuple[int, ...]  # attention window of each stage (0: global)
    global_att_blocks: tuple[int, ...]  # block indices with global attention (others are ignored, as upstream)
    pos_embed_bkg: tuple[int, int]  # grid of the stored background pos-embed
    q_pool: int = 3  # the first blocks of stages 1..q_pool max-pool q (and the shortcut)
    q_stride: int = 2
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    in_chans: int = 3
    patch_kernel: tuple[int, int] = (7, 7)
    patch_stride: tuple[int, int] = (4, 4)
    patch_padding: tuple[int, int] = (3, 3)
    d_model: int = 256  # FPN width
    fpn_top_down_levels: tuple[int, ...] = (2, 3)  # levels (0 = finest) that receive the top-down path
    fuse_type: Literal["sum", "avg"] = "sum"
    scalp: int = 1  # number of coarsest FPN levels dropped; vision_features is the coarsest one left

    def __post_init__(self):
        for name in ("embed_dims", "num_heads", "stages", "window_spec", "global_att_blocks", "pos_embed_bkg",
                     "patch_kernel", "patch_stride", "patch_padding", "fpn_top_down_levels"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        problems = []
        if self.family != FAMILY:
            problems.append(f"family must be {FAMILY!r}, got {self.family!r}")
        if not (len(self.embed_dims) == len(self.num_heads) == len(self.stages) == len(self.window_spec) == NUM_STAGES):
            problems.append(f"embed_dims, num_heads, stages and window_spec need {NUM_STAGES} entries each, got "
                            f"{self.embed_dims}, {self.num_heads}, {self.stages}, {self.window_spec}")
        else:
            problems += [f"stage {s}: width {d} is not divisible by {h} heads"
                         for s, (d, h) in enumerate(zip(self.embed_dims, self.num_heads)) if h <= 0 or d % h]
            if min(self.stages) < 1:
                problems.append(f"every stage needs at least one block, got stages {self.stages}")
            if self.window_spec[0] <= 0:
                problems.append("window_spec[0] sizes the window pos-embed and must be positive")
            if not 0 <= self.q_pool <= NUM_STAGES - 1:
                problems.append(f"q_pool must be in 0..{NUM_STAGES - 1}, got {self.q_pool}")
            for i, b in enumerate(block_plan(self)):
                if b.q_pool and b.window < self.q_stride:  # upstream divides by window // q_stride: 0 crashes
                    problems.append(f"block {i} pools q with stride {self.q_stride} but has "
                                    f"{'global attention' if not b.window else f'a window of {b.window}'}; upstream "
                                    "needs a window of at least the q stride at the q-pool blocks")
        if self.q_stride < 1 or len(self.pos_embed_bkg) != 2 or min(self.pos_embed_bkg) < 1:
            problems.append(f"q_stride {self.q_stride} / pos_embed_bkg {self.pos_embed_bkg} are not valid")
        if not 0 <= self.scalp < NUM_STAGES:
            problems.append(f"scalp must be in 0..{NUM_STAGES - 1}, got {self.scalp}")
        if any(not 0 <= lv < NUM_STAGES for lv in self.fpn_top_down_levels):
            problems.append(f"fpn_top_down_levels {self.fpn_top_down_levels} must be FPN levels 0..{NUM_STAGES - 1}")
        if self.fuse_type not in ("sum", "avg"):
            problems.append(f"fuse_type must be 'sum' or 'avg', got {self.fuse_type!r}")
        if problems:
            raise ValueError("HieraConfig: " + "; ".join(problems))

    @property
    def channel_list(self) -> tuple[int, ...]:
        """The trunk's output widths from coarse to fine (upstream's `backbone_channel_list`)."""
        return self.embed_dims[::-1]

    @property
    def image_size(self) -> tuple[int, int]:
        """A valid input size: 224 x 224 px (the study's size) if this encoder accepts it, else the next that fits."""
        for side in range(224, 4096):
            if input_size_problem(self, side, side) is None:
                return side, side
        raise ValueError(f"HieraConfig: no square input from 224 to 4095 px fits {self}")


class BlockSpec(NamedTuple):
    dim: int  # input width
    dim_out: int
    heads: int
    window: int  # 0: global attention
    q_pool: bool  # max-pool q and the shortcut by q_stride
    stage: int


def block_plan(config: HieraConfig) -> list[BlockSpec]:
    """Per block: widths, heads, window and q-pooling, as upstream's Hiera builds them. The first block of stages 1..3
    takes the previous stage's width and window (the lag), the new stage's heads, and pools q if its stage is among
    the first `q_pool` stage changes."""
    plan, index = [], 0
    for s, blocks in enumerate(config.stages):
        for j in range(blocks):
            first = s > 0 and j == 0
            window = config.window_spec[s - 1] if first else config.window_spec[s]
            plan.append(BlockSpec(
                dim=config.embed_dims[s - 1] if first else config.embed_dims[s], dim_out=config.embed_dims[s],
                heads=config.num_heads[s], window=0 if index in config.global_att_blocks else window,
                q_pool=first and s <= config.q_pool, stage=s))
            index += 1
    return plan


def _conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def input_size_problem(config: HieraConfig, height: int, width: int) -> str | None:
    """Why upstream cannot run an input of height x width px (it crashes, or silently mixes up windows), else None.

    Upstream needs (1) a patch grid that is a multiple of the first window (the window pos-embed is tiled over it),
    (2) at every q-pool block, as many pooled windows as windows (upstream re-derives the window count from the pooled
    map), and (3) each top-down FPN level exactly twice the size of the level above it. For SAM 2.1 B+ and L every
    multiple of 32 px fits.
    """
    c = config
    grid = tuple(_conv_out(n, k, s, p) for n, k, s, p in zip((height, width), c.patch_kernel, c.patch_stride,
                                                              c.patch_padding))
    if min(grid) < 1:
        return f"the patch grid {grid[0]}x{grid[1]} is empty"
    w0 = c.window_spec[0]
    if grid[0] % w0 or grid[1] % w0:
        return f"its patch grid {grid[0]}x{grid[1]} is not a multiple of the {w0}x{w0} window pos-embed"
    hw, stage_sizes, plan = grid, [], block_plan(c)
    for i, b in enumerate(plan):
        if b.q_pool:
            pooled = (hw[0] // c.q_stride, hw[1] // c.q_stride)
            if min(pooled) < 1:
                return f"block {i} would pool its {hw[0]}x{hw[1]} map to nothing"
            if b.window:
                small = b.window // c.q_stride
                if any(math.ceil(n / b.window) != math.ceil(p / small) for n, p in zip(hw, pooled)):
                    return (f"block {i} pools q inside {b.window}x{b.window} windows of a {hw[0]}x{hw[1]} map, and "
                            f"the pooled {pooled[0]}x{pooled[1]} map does not split into as many "
                            f"{small}x{small} windows")
            hw = pooled
        if i + 1 == len(plan) or plan[i + 1].stage != b.stage:
            stage_sizes.append(hw)
    for level in c.fpn_top_down_levels:
        if level < NUM_STAGES - 1:
            fine, coarse = stage_sizes[level], stage_sizes[level + 1]
            if fine != (2 * coarse[0], 2 * coarse[1]):
                return (f"FPN level {level} ({fine[0]}x{fine[1]}) is not twice level {level + 1} "
                        f"({coarse[0]}x{coarse[1]}) for the top-down sum")
    return None


def max_pool(x, stride: int):
    """nn.MaxPool2d(stride, stride, ceil_mode=False) on NHWC: the incomplete last row/column is dropped."""
    b, h, w, c = x.shape
    h2, w2 = h // stride, w // stride
    x = x[:, :h2 * stride, :w2 * stride]
    return x.reshape(b, h2, stride, w2, stride, c).max(axis=(2, 4))


class MultiScaleAttention(nn.Module):
    """Attention over each window (or the whole map); q is optionally max-pooled first (fused qkv, rows q, k, v)."""

    dim_out: int
    num_heads: int
    q_stride: int | None = None
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        b, h, w, _ = x.shape
        head_dim = self.dim_out // self.num_heads
        qkv = nn.Dense(3 * self.dim_out, dtype=self.dtype, name="qkv")(x)
        qkv = qkv.reshape(b, h * w, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.q_stride:
            q = max_pool(q.reshape(b, h, w, self.dim_out), self.q_stride)
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, self.num_heads, head_dim)
        out = jax.nn.dot_product_attention(q, k, v)  # scale head_dim**-0.5, no mask
        return nn.Dense(self.dim_out, dtype=self.dtype, name="proj")(out.reshape(b, h, w, self.dim_out))


class MultiScaleBlock(Part):
    """norm1 -> (shortcut projected and pooled where the width changes) windowed multi-scale attention -> residual,
    then norm2 -> MLP -> residual."""

    spec: BlockSpec = dataclasses.field(kw_only=True)

    @nn.compact
    def __call__(self, x):
        s, c = self.spec, self.config
        stride = c.q_stride if s.q_pool else None
        batch = x.shape[0]
        shortcut = x
        xn = layer_norm(c.norm_eps, "norm1", self.dtype)(x)
        if s.dim != s.dim_out:  # the shortcut is projected from the NORMED input, then pooled
            shortcut = nn.Dense(s.dim_out, dtype=self.dtype, name="proj")(xn)
            if stride:
                shortcut = max_pool(shortcut, stride)
        if s.window:
            hw = xn.shape[1:3]
            xn, counts = window_partition(xn, s.window)
        y = MultiScaleAttention(s.dim_out, s.heads, stride, self.dtype, name="attn")(xn)
        if s.window:
            if stride:  # upstream re-derives the window count from the pooled map; it must be the same count
                hw, small = shortcut.shape[1:3], s.window // stride
                pooled_counts = tuple(math.ceil(n / small) for n in hw)
                if pooled_counts != counts:
                    raise ValueError(f"sam2_hiera: q-pooled windows {pooled_counts} do not match the windows {counts}; "
                                     "the input size does not fit this encoder (see input_size_problem)")
            y = window_unpartition(y, batch, counts, hw)
        x = shortcut + y
        y = layer_norm(c.norm_eps, "norm2", self.dtype)(x)
        return x + Mlp(int(s.dim_out * c.mlp_ratio), dtype=self.dtype, name="mlp")(y)


class FpnNeck(Part):
    """Lateral 1x1 convs (`convs_k` takes trunk stage 4-k: coarse to fine), nearest 2x top-down into the configured
    levels. Returns the levels fine to coarse (NHWC)."""

    @nn.compact
    def __call__(self, xs):
        c = self.config
        n = len(xs) - 1
        out, prev = [None] * len(xs), None
        for i in range(n, -1, -1):
            lateral = nn.Conv(c.d_model, (1, 1), dtype=self.dtype, name=f"convs_{n - i}")(xs[i])
            if i in c.fpn_top_down_levels and prev is not None:
                top_down = jnp.repeat(jnp.repeat(prev, 2, axis=1), 2, axis=2)  # F.interpolate(x2, 'nearest')
                prev = lateral + top_down.astype(lateral.dtype)
                if c.fuse_type == "avg":
                    prev = prev / 2
            else:
                prev = lateral
            out[i] = prev
        return out


def _nchw(x):
    return jnp.transpose(x, (0, 3, 1, 2))


class Sam2HieraEncoder(Backbone):
    """SAM 2.1 `ImageEncoder(trunk=Hiera, neck=FpnNeck, scalp)`.

    Returns `vision_features` (the coarsest kept FPN level: stride 16 for SAM 2.1), `backbone_fpn_k` for the finer
    kept levels (upstream's `backbone_fpn[k]`; its last entry is `vision_features`), `trunk_stage1..4` (the Hiera
    stage outputs), all NCHW, plus `linear_head_input` (B, d_model) and `attention_head_input` (B, h*w, d_model).
    """

    @nn.compact
    def forward(self, images, train):
        c = self.config
        batch, height, width = images.shape[:3]
        problem = input_size_problem(c, height, width)
        if problem:
            raise ValueError(f"{c.family}: an input of {height}x{width} px does not fit this encoder: {problem}. "
                             f"Multiples of {c.patch_stride[0] * c.window_spec[0]} px fit the SAM 2.1 encoders")
        x = nn.Conv(c.embed_dims[0], c.patch_kernel, strides=c.patch_stride,
                    padding=tuple((p, p) for p in c.patch_padding), dtype=self.dtype, name="patch_embed")(images)
        grid = x.shape[1:3]
        dim, w0 = c.embed_dims[0], c.window_spec[0]
        pos_embed = self.param("pos_embed", nn.initializers.zeros, (1, *c.pos_embed_bkg, dim))
        pos_window = self.param("pos_embed_window", nn.initializers.zeros, (1, w0, w0, dim))
        pos = resize_bicubic(pos_embed.astype(jnp.float32), size=grid, axes=(1, 2))
        pos = pos + jnp.tile(pos_window.astype(jnp.float32), (1, grid[0] // w0, grid[1] // w0, 1))
        x = x + pos.astype(x.dtype)

        plan = block_plan(c)
        stages = []
        for i, spec in enumerate(plan):
            x = MultiScaleBlock(c, self.dtype, spec=spec, name=f"blocks_{i}")(x)
            if i + 1 == len(plan) or plan[i + 1].stage != spec.stage:
                stages.append(x)
        features = FpnNeck(c, self.dtype, name="neck")(stages)
        features = features[:len(features) - c.scalp]
        vision = features[-1]
        out = {"vision_features": _nchw(vision)}
        out |= {f"backbone_fpn_{k}": _nchw(f) for k, f in enumerate(features[:-1])}
        out |= {f"trunk_stage{s + 1}": _nchw(f) for s, f in enumerate(stages)}
        tokens = vision.reshape(batch, -1, vision.shape[-1])
        return out | {"linear_head_input": tokens.mean(axis=1), "attention_head_input": tokens}


def layers(config: HieraConfig) -> list[str]:
    """The patch embedding and position embeddings, then `blocks_0` ... in network order (numbered across stages);
    the FPN neck comes after."""
    return [r"(patch_embed|pos_embed|pos_embed_window)(/|$)"] + [f"blocks_{i}/" for i in range(len(block_plan(config)))]


def lora_targets(config: HieraConfig) -> list[str]:
    return [r"blocks_\d+/(attn/qkv|mlp/(fc1|fc2))/kernel$"]
