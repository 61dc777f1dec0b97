"""The SigLIP vision tower (transformers' `SiglipVisionModel`): SigLIP, the SigLIP 2 fixed-resolution checkpoints and
Google's MedSigLIP, which all share this layout.

Patch embedding (a strided conv with bias) + a learned position table (no CLS token: every token is a patch), pre-norm
blocks (LayerNorm, multi-head self-attention, LayerNorm, fc1 -> GELU (tanh form, `gelu_pytorch_tanh`) -> fc2), the
`post_layernorm`, and the multihead attention-pooling ("MAP") head: a learned probe attends to the normed tokens with
`torch.nn.MultiheadAttention` semantics, then `x + mlp(layernorm(x))`; its single output is `pooler_output`.

The position table is resized at every forward the way `interpolate_pos_encoding=True` does it: used as stored when
the patch count matches and the image is square, else bicubic (align_corners=False, no antialias) from its square
grid to the input's grid. At the stored size this is transformers' default forward. Input is NHWC float.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax.numpy as jnp
from flax import linen as nn

from medjax.models.base import Backbone, ConfigMixin, Part
from medjax.models.layers import Attention, Mlp, dense, gelu, head_major_attention, layer_norm, patch_embed
from medjax.resize import resize_bicubic

FAMILY = "siglip"


@dataclasses.dataclass(frozen=True)
class SiglipConfig(ConfigMixin):
    family: Literal["siglip"]
    width: int  # hidden_size
    depth: int  # num_hidden_layers
    num_heads: int  # num_attention_heads
    patch_size: int
    pos_grid: tuple[int, int]  # the stored position table's (square) grid: image_size // patch_size per side
    mlp_hidden: int  # intermediate_size
    in_chans: int = 3
    norm_eps: float = 1e-6  # layer_norm_eps: every LayerNorm (blocks, post_layernorm, the head's)
    act: Literal["gelu_tanh", "gelu"] = "gelu_tanh"  # gelu_pytorch_tanh / exact-erf gelu
    use_head: bool = True  # vision_use_head: the attention-pooling head

    def __post_init__(self):
        self.check_family(FAMILY, "pos_grid")
        if self.pos_grid[0] != self.pos_grid[1]:
            raise ValueError(f"SiglipConfig: the position table is square (image_size // patch_size per side), got "
                             f"grid {self.pos_grid}")
        if self.width % self.num_heads:
            raise ValueError(f"SiglipConfig: width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.act not in ("gelu_tanh", "gelu"):
            raise ValueError(f"SiglipConfig: act must be 'gelu_tanh' or 'gelu', got {self.act!r}")

    @property
    def image_size(self) -> tuple[int, int]:
        """The input size at which the stored position table is used as is."""
        return self.pos_grid[0] * self.patch_size, self.pos_grid[1] * self.patch_size


def mlp(config: SiglipConfig, dtype) -> Mlp:
    """SiglipMLP: fc1 -> GELU -> fc2. gelu_pytorch_tanh is torch's GELU(approximate='tanh'), flax's default form;
    "gelu" the exact erf form."""
    return Mlp(config.mlp_hidden, True, dtype, nn.gelu if config.act == "gelu_tanh" else gelu, name="mlp")


class Block(Part):
    """SiglipEncoderLayer: x + attn(norm1(x)), then x + mlp(norm2(x)). The q/k/v projections are fused in `attn/qkv`."""

    @nn.compact
    def __call__(self, x):
        c = self.config
        y = layer_norm(c.norm_eps, "norm1", self.dtype)(x)
        x = x + Attention(c.num_heads, True, True, self.dtype, name="attn")(y)
        return x + mlp(c, self.dtype)(layer_norm(c.norm_eps, "norm2", self.dtype)(x))


class MapHead(Part):
    """SiglipMultiheadAttentionPoolingHead: a learned probe (1, 1, D) attends to the tokens (nn.MultiheadAttention:
    q from the probe, k and v from the tokens, heads head-major, scale head_dim ** -0.5, out_proj), then
    `x + mlp(layernorm(x))`; returns the probe's output (B, D)."""

    @nn.compact
    def __call__(self, tokens):
        c = self.config
        batch, n, dim = tokens.shape
        heads, head_dim = c.num_heads, dim // c.num_heads
        probe = self.param("probe", nn.initializers.normal(1.0), (1, 1, dim))
        probe = jnp.broadcast_to(probe.astype(tokens.dtype), (batch, 1, dim))
        q = dense(dim, True, self.dtype, "q")(probe).reshape(batch, 1, heads, head_dim).transpose(0, 2, 1, 3)
        k = dense(dim, True, self.dtype, "k")(tokens).reshape(batch, n, heads, head_dim).transpose(0, 2, 1, 3)
        v = dense(dim, True, self.dtype, "v")(tokens).reshape(batch, n, heads, head_dim).transpose(0, 2, 1, 3)
        x = head_major_attention(q, k, v).transpose(0, 2, 1, 3).reshape(batch, 1, dim)
        x = dense(dim, True, self.dtype, "out_proj")(x)
        x = x + mlp(c, self.dtype)(layer_norm(c.norm_eps, "norm", self.dtype)(x))
        return x[:, 0]


class TokenGrid(nn.Module):
    """The final (post-layernormed) tokens as an NHWC map (B, gh, gw, D): no parameters, the identity up to a
    reshape. It exists so that Grad-CAM (`Family.gradcam_layer`) has a feature map to read and perturb."""

    grid: tuple[int, int]

    @nn.compact
    def __call__(self, tokens):
        return tokens.reshape(tokens.shape[0], self.grid[0], self.grid[1], tokens.shape[-1])


def position_table(config: SiglipConfig, table, grid: tuple[int, int], image_hw: tuple[int, int]):
    """The (1, gh * gw, D) position embeddings for a grid of patches, as SiglipVisionEmbeddings.interpolate_pos_encoding
    computes them: the stored table when the patch count matches and the image is square (pixels), else a bicubic
    resize (align_corners=False, no antialias) of the stored square grid to `grid`."""
    stored = config.pos_grid
    tokens = grid[0] * grid[1]
    if tokens == stored[0] * stored[1] and image_hw[0] == image_hw[1]:
        return table
    patch_pos = table.reshape(1, stored[0], stored[1], -1).astype(jnp.float32)
    patch_pos = resize_bicubic(patch_pos, size=grid, antialias=False, axes=(1, 2))
    return patch_pos.reshape(1, tokens, -1).astype(table.dtype)


class SiglipVisionTower(Backbone):
    """Returns a dict: transformers' `last_hidden_state` (post-layernormed tokens) and `pooler_output` (the head's
    output; only with `use_head`), plus `linear_head_input` (the pooled output, else the token mean) and
    `attention_head_input` (the post-layernormed tokens, all patches)."""

    @nn.compact
    def forward(self, images, train):
        c = self.config
        batch, height, width = images.shape[:3]
        x, grid = patch_embed(images, c, self.dtype)  # a remainder below one patch is not seen
        num_pos = c.pos_grid[0] * c.pos_grid[1]
        table = self.param("pos_embed", nn.initializers.normal(1.0 / math.sqrt(c.width)), (1, num_pos, c.width))
        x = x + position_table(c, table, grid, (height, width)).astype(x.dtype)
        for i in range(c.depth):
            x = Block(c, self.dtype, name=f"blocks_{i}")(x)
        x = layer_norm(c.norm_eps, "post_layernorm", self.dtype)(x)
        x = TokenGrid(grid, name="token_grid")(x).reshape(batch, grid[0] * grid[1], c.width)
        out = {"last_hidden_state": x}
        if c.use_head:
            out["pooler_output"] = MapHead(c, self.dtype, name="head")(x)
        pooled = out["pooler_output"] if c.use_head else x.mean(axis=1)
        return out | {"linear_head_input": pooled, "attention_head_input": x}


# ------------------------------------------------------------------------------------------------ contract facts

EMBEDDINGS = r"(patch_embed|pos_embed)(/|$)"


def layers(config: SiglipConfig) -> list[str]:
    """The embeddings (patch conv, position table), then `blocks_0` ... `blocks_{depth-1}`; `post_layernorm` and the
    attention-pooling head come after the blocks."""
    return [EMBEDDINGS] + [f"blocks_{i}/" for i in range(config.depth)]


def lora_targets(config: SiglipConfig) -> list[str]:
    """The fused qkv and the MLP kernels (fc1, fc2) of every block (the pooling head is left as it is)."""
    return [r"blocks_\d+/(attn/qkv|mlp/(fc1|fc2))/kernel$"]
