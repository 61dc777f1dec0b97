"""One Vision Transformer for the ViT family: DINOv2 (with its ImageNet linear classifiers), MAE, DeiT, AIMv2, the
open_clip CLIP and CoCa towers, transformers' ViT / ViT-MSN / CLIP vision towers and BiomedCLIP's timm trunk.

The families differ only in switches of `ViTConfig` (CLS token, LayerNorm or RMSNorm, LayerScale, SwiGLU, the MLP
activation, registers, ln_pre, the attentional pooler, the tanh pooler, projection, how the pos-embed follows the
input size) and in which outputs they expose. Input is NHWC float.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from medjax.models.base import Backbone, ConfigMixin, Part
from medjax.models.layers import (
    Attention,
    AttentionalPooler,
    LayerScale,
    Mlp,
    SwiGLU,
    dense,
    gelu,
    layer_norm,
    patch_embed,
    quick_gelu,
    rms_norm,
)
from medjax.resize import resize_bicubic

NAMES = ("dinov2", "mae", "deit", "clip", "aimv2", "coca", "hf_vit", "hf_clip", "biomedclip")
# The families whose protocol taps are the block outputs as they are (transformers' `hidden_states[-n:]`, as the
# radiology study reads them), not normed by the final norm.
UNNORMED_TAPS = ("hf_vit", "hf_clip")


@dataclasses.dataclass(frozen=True)
class ViTConfig(ConfigMixin):
    family: Literal["dinov2", "mae", "deit", "clip", "aimv2", "coca", "hf_vit", "hf_clip", "biomedclip"]
    width: int
    depth: int
    num_heads: int
    patch_size: int
    pos_grid: tuple[int, int]  # grid of the stored pos-embed (patch part)
    mlp_hidden: int
    ffn: Literal["mlp", "swiglu"] = "mlp"
    in_chans: int = 3
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    patch_bias: bool = True
    layerscale: bool = False
    norm: Literal["layer", "rms"] = "layer"
    norm_eps: float = 1e-6
    class_token: bool = True
    patch_norm: bool = False  # AIMv2: RMSNorm right after the patch embedding
    num_registers: int = 0
    ln_pre: bool = False
    proj_dim: int | None = None  # CLIP / CoCa: pooled = ln_post(...) @ proj
    proj_bias_term: bool = False  # the projection adds `proj_bias` (open_clip TimmModel with timm_proj_bias)
    attn_pool_queries: int = 0  # CoCa's attentional pooler (0: none)
    attn_pool_heads: int = 8
    # How the stored pos-embed meets another input grid, at every forward:
    #   "none"   - the grid must match (MAE, DeiT, CLIP resize at conversion time instead);
    #   "offset" - DINOv2 official: bicubic with scale_factor (g + offset) / M;
    #   "size"   - bicubic to the target size (DINOv2 registers, transformers' Dinov2, and transformers' ViT and
    #              CLIP with interpolate_pos_encoding=True);
    #   "truncate" - AIMv2 (apple/ml-aim): the first N rows of the table, for N <= stored tokens.
    pos_resize: Literal["none", "offset", "size", "truncate"] = "none"
    pos_resize_offset: float = 0.0
    pos_resize_antialias: bool = False
    act: Literal["gelu", "quick_gelu"] = "gelu"  # the MLP activation: exact-erf GELU, or CLIP's x * sigmoid(1.702 x)
    pooler_dim: int = 0  # transformers' ViTModel pooler: tanh(Dense(pooler_dim)(final-normed CLS)); 0: none
    # DINOv2's ImageNet linear classifier (`dinov2_*_linear[4]_head.pth`): 0 none, or its 1 / 4 last blocks
    lc_layers: int = 0
    lc_classes: int = 1000
    # How the blocks run; neither changes the outputs (tests/test_perf.py).
    #   remat - recompute each block's activations in the backward pass instead of keeping them (nn.remat): the
    #           activation memory of a step drops from `depth` blocks' worth to about one, for ~1/3 more FLOPs;
    #   scan  - one nn.scan over the blocks: XLA compiles one block body instead of `depth` copies. The parameters
    #           then live stacked under `blocks` (leading axis = depth) instead of `blocks_0` ... `blocks_{depth-1}`;
    #           `stack_blocks` / `unstack_blocks` convert between the two layouts (checkpoints are stored unstacked).
    remat: bool = False
    scan: bool = False

    def __post_init__(self):
        if self.family not in NAMES:
            raise ValueError(f"ViTConfig.family must be one of {NAMES}, got {self.family!r}")
        if self.lc_layers not in (0, 1, 4) or (self.lc_layers and self.family != "dinov2"):
            raise ValueError(f"ViTConfig: lc_layers must be 0, or 1 / 4 for a dinov2 backbone, got {self.lc_layers} "
                             f"({self.family})")
        if self.lc_layers > self.depth:
            raise ValueError(f"ViTConfig: a linear classifier over the last {self.lc_layers} blocks needs depth >= "
                             f"{self.lc_layers}, got {self.depth}")
        if self.width % self.num_heads:
            raise ValueError(f"ViTConfig: width {self.width} is not divisible by num_heads {self.num_heads}")
        object.__setattr__(self, "pos_grid", tuple(self.pos_grid))

    @property
    def image_size(self) -> tuple[int, int]:
        """The input size at which the stored pos-embed is used as is."""
        return self.pos_grid[0] * self.patch_size, self.pos_grid[1] * self.patch_size


def make_norm(config: ViTConfig, name: str, dtype=None):
    return (rms_norm if config.norm == "rms" else layer_norm)(config.norm_eps, name, dtype)


class Block(Part):
    @nn.compact
    def __call__(self, x):
        c = self.config
        y = make_norm(c, "norm1", self.dtype)(x)
        y = Attention(c.num_heads, c.qkv_bias, c.proj_bias, self.dtype, name="attn")(y)
        x = x + (LayerScale(name="ls1")(y) if c.layerscale else y)
        y = make_norm(c, "norm2", self.dtype)(x)
        if c.ffn == "swiglu":
            y = SwiGLU(c.mlp_hidden, c.ffn_bias, self.dtype, name="mlp")(y)
        else:
            y = Mlp(c.mlp_hidden, c.ffn_bias, self.dtype, quick_gelu if c.act == "quick_gelu" else gelu, name="mlp")(y)
        return x + (LayerScale(name="ls2")(y) if c.layerscale else y)


@jax.custom_vjp
def _materialize_cotangent(x):
    """Identity whose backward hands the cotangent through a `lax.cond`, which XLA cannot fuse across.

    Without it, XLA:CPU fuses the residual stream's gradient (a growing chain of adds of every later block's
    LayerNorm backward) into each of its consumers instead of computing it once: the backward of an unrolled ViT does
    O(depth^2) elementwise work (ViT-B: ~1.4x the step time on 2 cores). Both branches are the identity."""
    return x


def _materialize_fwd(x):
    return x, None


def _materialize_bwd(_, g):
    first = g.reshape(-1)[0]
    return (jax.lax.cond(first == first, lambda t: t, lambda t: t * 1, g),)


_materialize_cotangent.defvjp(_materialize_fwd, _materialize_bwd)


def apply_blocks(config: ViTConfig, x, dtype=None):
    """The `depth` blocks, one after another: unrolled (`blocks_<i>`) or scanned (`blocks`, stacked), each
    optionally rematerialised. Must be called inside a compact method (the blocks become its submodules)."""
    return block_outputs(config, x, dtype, 1)[-1]


def block_outputs(config: ViTConfig, x, dtype=None, last: int = 1) -> list:
    """`apply_blocks`, returning the outputs of the `last` last blocks in block order (the final one last)."""
    # prevent_cse keeps XLA from merging the recomputation into the forward pass; a scan body already prevents it.
    block = nn.remat(Block, prevent_cse=not config.scan) if config.remat else Block
    if not config.scan:
        barrier = jax.default_backend() == "cpu"  # GPU/TPU fusion does not duplicate the chain (and a cond syncs)
        outputs = []
        for i in range(config.depth):
            if barrier:
                x = _materialize_cotangent(x)
            x = block(config, dtype, name=f"blocks_{i}")(x)
            if i >= config.depth - last:
                outputs.append(x)
        return outputs
    if last == 1:
        scan = nn.scan(lambda module, carry, _: (module(carry), None), variable_axes={"params": 0},
                       split_rngs={"params": True}, length=config.depth)
        x, _ = scan(block(config, dtype, name="blocks"), x, None)
        return [x]

    def body(module, carry, _):
        y = module(carry)
        return y, y

    scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True}, length=config.depth)
    _, ys = scan(block(config, dtype, name="blocks"), x, None)
    return [ys[i] for i in range(config.depth - last, config.depth)]


def _block_names(params: dict) -> list[str]:
    names = sorted((k for k in params if re.fullmatch(r"blocks_\d+", k)), key=lambda k: int(k[len("blocks_"):]))
    if names != [f"blocks_{i}" for i in range(len(names))]:
        raise ValueError(f"the blocks must be numbered blocks_0 ... blocks_<depth-1> without gaps, got {names}")
    return names


def stack_blocks(params: dict) -> dict:
    """The unrolled layout (`blocks_0` ... `blocks_{L-1}`, as converters write it) -> the scanned one (`blocks`,
    every leaf with a leading axis of length L), for ViTConfig(scan=True). Takes a backbone's parameters or a
    classifier's (then its `backbone` is converted); numpy leaves stay numpy."""
    if "backbone" in params and "blocks_0" not in params:
        return params | {"backbone": stack_blocks(params["backbone"])}
    if "blocks" in params:
        raise ValueError("the parameters are already stacked (they have `blocks`)")
    names = _block_names(params)
    if not names:
        raise ValueError("no blocks_<i> to stack: not the parameters of a ViT backbone")
    leaves = jax.tree_util.tree_leaves([params[k] for k in names])
    stack = np.stack if all(isinstance(v, np.ndarray) for v in leaves) else jnp.stack
    stacked = jax.tree_util.tree_map(lambda *xs: stack(xs), *[params[k] for k in names])
    return {k: v for k, v in params.items() if k not in names} | {"blocks": stacked}


def unstack_blocks(params: dict) -> dict:
    """The inverse of `stack_blocks`: `blocks` (leading axis L) -> `blocks_0` ... `blocks_{L-1}`."""
    if "backbone" in params and "blocks" not in params:
        return params | {"backbone": unstack_blocks(params["backbone"])}
    if "blocks" not in params:
        raise ValueError("no stacked `blocks` to unstack")
    depth = {np.shape(v)[0] for v in jax.tree_util.tree_leaves(params["blocks"])}
    if len(depth) != 1:
        raise ValueError(f"stacked blocks disagree on their leading (depth) axis: {sorted(depth)}")
    unstacked = {f"blocks_{i}": jax.tree_util.tree_map(lambda v, i=i: v[i], params["blocks"])
                 for i in range(depth.pop())}
    return {k: v for k, v in params.items() if k != "blocks"} | unstacked


def interpolate_pos_embed(config: ViTConfig, pos_embed, grid: tuple[int, int], image_hw: tuple[int, int]):
    """The pos-embed (1, [CLS +] tokens, D) for a `grid` of patches, as the upstream implementation adapts it at run
    time. Like upstream, the stored table is used unchanged when the token count matches and the image is square."""
    stored = config.pos_grid
    tokens = grid[0] * grid[1]
    if tokens == stored[0] * stored[1] and image_hw[0] == image_hw[1]:
        return pos_embed
    if config.pos_resize == "truncate" and tokens <= stored[0] * stored[1]:
        return pos_embed[:, :int(config.class_token) + tokens]
    if config.pos_resize in ("none", "truncate"):
        raise ValueError(
            f"{config.family} input of {image_hw[0]}x{image_hw[1]} px gives a {grid[0]}x{grid[1]} patch grid, but the "
            f"pos-embed is stored for {stored[0]}x{stored[1]} ({config.image_size[0]}x{config.image_size[1]} px) and "
            "this family does not resize it at run time; convert the checkpoint again with `img_size` set in --config "
            "(`image_size` in an open_clip vision_cfg; `timm_model_kwargs.img_size` for BiomedCLIP)")
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    patch_pos = patch_pos.reshape(1, stored[0], stored[1], -1).astype(jnp.float32)
    if config.pos_resize == "offset":
        if stored[0] != stored[1]:
            raise ValueError(f"offset pos-embed resize needs a square stored grid, got {stored}")
        scale = tuple((g + config.pos_resize_offset) / stored[0] for g in grid)
        patch_pos = resize_bicubic(patch_pos, scale_factor=scale, antialias=config.pos_resize_antialias, axes=(1, 2))
    else:
        patch_pos = resize_bicubic(patch_pos, size=grid, antialias=config.pos_resize_antialias, axes=(1, 2))
    if patch_pos.shape[1:3] != tuple(grid):
        raise ValueError(f"pos-embed resize produced grid {patch_pos.shape[1:3]}, expected {grid}")
    patch_pos = patch_pos.reshape(1, tokens, -1).astype(pos_embed.dtype)
    return jnp.concatenate([cls_pos, patch_pos], axis=1)


class VisionTransformer(Backbone):
    """Returns a dict: the upstream-named outputs of the family plus `linear_head_input` and `attention_head_input`."""

    @nn.compact
    def forward(self, images, train):
        c = self.config
        batch, height, width = images.shape[:3]
        if height % c.patch_size or width % c.patch_size:
            raise ValueError(f"{c.family}: input {height}x{width} px is not a multiple of the patch size "
                             f"{c.patch_size}")
        x, grid = patch_embed(images, c, self.dtype, c.patch_bias)
        if c.patch_norm:
            x = make_norm(c, "patch_norm", self.dtype)(x)
        num_pos = int(c.class_token) + c.pos_grid[0] * c.pos_grid[1]
        pos_embed = self.param("pos_embed", nn.initializers.normal(0.02), (1, num_pos, c.width))
        pos_embed = interpolate_pos_embed(c, pos_embed, grid, (height, width))
        if c.class_token:
            cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, c.width))
            x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(x.dtype), (batch, 1, c.width)), x], axis=1)
        x = x + pos_embed.astype(x.dtype)
        if c.num_registers:  # registers go after CLS and get no pos-embed
            reg = self.param("reg_tokens", nn.initializers.normal(1e-6), (1, c.num_registers, c.width))
            x = jnp.concatenate([x[:, :1], jnp.broadcast_to(reg.astype(x.dtype), (batch, c.num_registers, c.width)),
                                 x[:, 1:]], axis=1)
        if c.ln_pre:
            x = make_norm(c, "ln_pre", self.dtype)(x)
        last = block_outputs(c, x, self.dtype, max(c.lc_layers, 1))
        x = last[-1]
        if c.attn_pool_queries:
            return self._coca_outputs(x)
        norm = make_norm(c, "norm", self.dtype)
        x_norm = norm(x)
        out = self._outputs(x, x_norm)
        if c.lc_layers:
            out |= self._linear_classifier([norm(y) for y in last[:-1]] + [x_norm])
        return out

    def _outputs(self, x_prenorm, x_norm):
        c = self.config
        first_patch = 1 + c.num_registers
        cls, patches = x_norm[:, 0], x_norm[:, first_patch:]
        if c.family == "dinov2":
            out = {"x_norm_clstoken": cls, "x_norm_regtokens": x_norm[:, 1:first_patch], "x_norm_patchtokens": patches,
                   "x_prenorm": x_prenorm}
            # The attention head consumes the patch tokens before the final norm (SPEC section 3).
            return out | {"linear_head_input": cls, "attention_head_input": x_prenorm[:, first_patch:]}
        if c.family == "mae":
            return {"x_norm": x_norm, "linear_head_input": patches.mean(axis=1), "attention_head_input": patches}
        if c.family == "deit":
            return {"x_norm_clstoken": cls, "debug_x_norm": x_norm, "linear_head_input": cls,
                    "attention_head_input": patches}
        if c.family == "aimv2":  # no CLS: every token is a patch
            return {"last_hidden_state": x_norm, "debug_last_block_prenorm": x_prenorm,
                    "linear_head_input": x_norm.mean(axis=1), "attention_head_input": x_norm}
        if c.family == "hf_vit":  # transformers ViTModel / ViTMSNModel (the study's feature: hidden_states[-1] CLS)
            out = {"last_hidden_state": x_norm, "cls": cls, "debug_last_block_prenorm": x_prenorm}
            if c.pooler_dim:
                out["pooler_output"] = jnp.tanh(dense(c.pooler_dim, True, self.dtype, "pooler")(cls))
            return out | {"linear_head_input": x_prenorm[:, 0], "attention_head_input": patches}
        if c.family == "hf_clip":  # transformers CLIPVisionModel[WithProjection]: last_hidden_state is not post-normed
            out = {"last_hidden_state": x_prenorm, "pooler_output": cls}
            if c.proj_dim:
                out["image_embeds"] = self._project(cls)
            return out | {"linear_head_input": x_prenorm[:, 0], "attention_head_input": patches}
        if c.family == "biomedclip":  # open_clip TimmModel: head.proj(final-normed CLS)
            features = self._project(cls)
            return {"image_features": features, "trunk_tokens": x_norm, "linear_head_input": features,
                    "attention_head_input": patches}
        pooled = self._project(cls)
        return {"pooled": pooled, "tokens": patches, "debug_pooled_pre_proj": cls, "debug_trunk_out": x_prenorm,
                "linear_head_input": pooled, "attention_head_input": patches}

    def _linear_classifier(self, normed: list):
        """DINOv2's hub `_LinearClassifierWrapper`: the final-normed CLS of each of the last 1 / 4 blocks, then the
        mean of the last block's final-normed patch tokens (registers excluded), through `lc_head`."""
        c = self.config
        first_patch = 1 + c.num_registers
        pieces = [y[:, 0] for y in normed] + [normed[-1][:, first_patch:].mean(axis=1)]
        linear_input = jnp.concatenate(pieces, axis=-1)
        logits = dense(c.lc_classes, True, self.dtype, "lc_head")(linear_input)
        return {"lc_linear_input": linear_input, "lc_logits": logits}

    def _coca_outputs(self, trunk_out):
        """CoCa: the pooler's first output, ln_post'd and projected, is `pooled`; the other outputs are `tokens`."""
        c = self.config
        pool = AttentionalPooler(c.proj_dim, c.attn_pool_heads, c.attn_pool_queries, c.norm_eps, self.dtype,
                                 name="attn_pool")(trunk_out)
        x = make_norm(c, "norm", self.dtype)(pool)
        pooled, tokens = self._project(x[:, 0]), x[:, 1:]
        return {"pooled": pooled, "tokens": tokens, "debug_pooled_pre_proj": x[:, 0], "debug_trunk_out": trunk_out,
                "debug_attn_pool_out": pool, "linear_head_input": pooled,
                "attention_head_input": jnp.concatenate([pooled[:, None], tokens], axis=1)}

    def _project(self, x):
        dim = x.shape[-1]
        proj = self.param("proj", nn.initializers.normal(dim ** -0.5), (dim, self.config.proj_dim))
        out = jnp.dot(x, proj.astype(x.dtype))
        if self.config.proj_bias_term:
            out = out + self.param("proj_bias", nn.initializers.zeros, (self.config.proj_dim,)).astype(x.dtype)
        return out


# ------------------------------------------------------------------------------------------------ contract facts

EMBEDDINGS = r"(patch_embed|patch_norm|cls_token|pos_embed|reg_tokens|ln_pre)(/|$)"


def layers(config: ViTConfig) -> list[str]:
    """The embeddings, then `blocks_0` ... `blocks_{depth-1}`; the final norm, pooler and projection come after."""
    if config.scan:
        raise ValueError("model.scan=True stacks the blocks in one array per parameter, so per-block rules (partial "
                         "freezing, layer-wise lr decay) cannot select them; use model.scan=False")
    return [EMBEDDINGS] + [f"blocks_{i}/" for i in range(config.depth)]


def lora_targets(config: ViTConfig) -> list[str]:
    """The qkv and MLP kernels (fc1/fc2, or SwiGLU's w12/w3) of every block."""
    return [r"blocks_\d+/(attn/qkv|mlp/(fc1|fc2|w12|w3))/kernel$"]


def max_taps(config: ViTConfig) -> int:
    """A ViT with a CLS token offers the CLS of each of its blocks; the others (and BiomedCLIP, whose feature is its
    projected vector, as the radiology study takes it) only their final feature."""
    if config.family == "biomedclip":
        return 1
    return config.depth if config.class_token and not config.attn_pool_queries else 1


def taps(config: ViTConfig, num_blocks: int, dtype=None):
    """The normed CLS of the last n blocks (DINOv2's `get_intermediate_layers(n, norm=True)`, in block order) and the
    mean of the last block's normed patch tokens (registers excluded). The block outputs are captured with flax's
    `capture_intermediates` and normed with the final norm's own parameters. The transformers towers (`hf_vit`,
    `hf_clip`) give their block outputs unnormed, as the radiology study reads `hidden_states[-n:]`."""
    model = VisionTransformer(config, dtype)
    norm = make_norm(config, None, dtype)
    first_patch = 1 + config.num_registers
    names = [f"blocks_{i}" for i in range(config.depth - num_blocks, config.depth)]

    def fn(variables, images):
        blocks_only = lambda m, method: isinstance(m, Block) and method == "__call__"  # noqa: E731
        _, state = model.apply(variables, images, mutable=["intermediates"], capture_intermediates=blocks_only)
        outputs = [state["intermediates"][n]["__call__"][0] for n in names]
        normed = outputs if config.family in UNNORMED_TAPS else \
            [norm.apply({"params": variables["params"]["norm"]}, x) for x in outputs]
        return {"cls": jnp.stack([x[:, 0] for x in normed], axis=1).astype(jnp.float32),
                "patch_mean": normed[-1][:, first_patch:].mean(axis=1).astype(jnp.float32)}
    return fn
