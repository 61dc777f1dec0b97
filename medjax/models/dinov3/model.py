"""DINOv3 ViT in Flax: transformers' `DINOv3ViTModel` and the official facebookresearch/dinov3 `DinoVisionTransformer`.

[CLS, registers, patches] run through pre-norm blocks whose attention rotates the queries and keys of the patch tokens
by a 2-D rotary position embedding (RoPE; CLS and registers are not rotated), with LayerScale on both residual
branches and a plain (fc1 -> act -> fc2) or gated (w3(act(w1 x) * w2 x), SwiGLU) MLP. There is no learned position
table: the RoPE angles are computed for the patch grid of every input, so any size and aspect ratio runs as upstream
runs it. The mask token (masked-image pretraining only) is not part of the model. Input is NHWC float.

RoPE, as both upstreams compute it: the patch centres (i + 0.5) / n of each axis (n = the axis' patch count with
`separate` normalisation, min(h, w) or max(h, w) with `min` / `max`), mapped to [-1, 1]; per head dimension pair the
angle 2 pi * coord / period, the first half of the pairs over y, the second over x, tiled twice across the head;
q' = q cos + rotate_half(q) sin. The periods are base^(4k / head_dim) (k < head_dim / 4, `rope_theta`), or
geometrically spaced between `rope_min_period` and `rope_max_period`. transformers computes them at run time
(multiplying by their inverse); the official code keeps them in its state dict (`rope_embed.periods`, stored in
bfloat16 by the released files), which `rope_stored_periods` reproduces: they are then the `rope/periods` variable,
read from the checkpoint. In training mode (`train=True`) both upstreams jitter the coordinates (shift, jitter,
rescale: `rope_shift`, `rope_jitter`, `rope_rescale`), drawn here from the `dropout` rng stream.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from medjax.models.base import Backbone, ConfigMixin, Part
from medjax.models.layers import (
    LayerScale,
    Mlp,
    cudnn_attention,
    dense,
    gelu,
    head_major_attention,
    layer_norm,
    patch_embed,
    use_cudnn_attention,
)

FAMILY = "dinov3"
ACTIVATIONS = {"gelu": gelu, "silu": nn.silu, "swish": nn.silu, "relu": nn.relu,
               # torch's tanh approximation (transformers' gelu_new / gelu_pytorch_tanh) is flax's approximate gelu
               "gelu_new": nn.gelu, "gelu_pytorch_tanh": nn.gelu}
NORMALIZE = ("separate", "min", "max")


@dataclasses.dataclass(frozen=True)
class DINOv3Config(ConfigMixin):
    family: str = FAMILY
    width: int = 384
    depth: int = 12
    num_heads: int = 6
    patch_size: int = 16
    mlp_hidden: int = 1536  # the MLP's hidden width (gated: of each of w1 / w2)
    gated_mlp: bool = False  # SwiGLU-style w3(act(w1 x) * w2 x) instead of fc2(act(fc1 x))
    act: str = "gelu"  # the MLP activation (transformers' hidden_act; the official gated MLP is always silu)
    in_chans: int = 3
    img_size: int = 224  # the nominal input size (the network takes any size)
    num_registers: int = 4
    query_bias: bool = True
    key_bias: bool = False  # the official files mask the key bias (mask_k_bias): transformers drops it
    value_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True
    layerscale: bool = True
    norm_eps: float = 1e-5
    rope_theta: float | None = 100.0
    rope_min_period: float | None = None  # with rope_max_period instead of rope_theta (official code only)
    rope_max_period: float | None = None
    rope_normalize: str = "separate"
    rope_stored_periods: bool = False  # the periods are the `rope/periods` variable (official files), not computed
    # training-mode coordinate augmentation (None: off), one draw per batch as upstream
    rope_shift: float | None = None
    rope_jitter: float | None = None
    rope_rescale: float | None = 2.0
    remat: bool = False  # recompute each block in the backward pass (activation memory of ~one block)

    def __post_init__(self):
        self.check_family(FAMILY)
        if self.width % self.num_heads or (self.width // self.num_heads) % 4:
            raise ValueError(f"DINOv3Config: width {self.width} / num_heads {self.num_heads} must give a head size "
                             "divisible by 4 (2-D RoPE)")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"DINOv3Config: act {self.act!r} is not one of {sorted(ACTIVATIONS)}")
        if self.rope_normalize not in NORMALIZE:
            raise ValueError(f"DINOv3Config: rope_normalize {self.rope_normalize!r} is not one of {NORMALIZE}")
        both = self.rope_min_period is not None and self.rope_max_period is not None
        if (self.rope_theta is None) == (not both) or (self.rope_theta is not None and both):
            raise ValueError("DINOv3Config: give rope_theta, or rope_min_period and rope_max_period (not both)")
        if self.depth < 1 or self.num_registers < 0 or self.patch_size < 1:
            raise ValueError("DINOv3Config: depth >= 1, num_registers >= 0 and patch_size >= 1 required")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


# ------------------------------------------------------------------------------------------------ RoPE


def rope_periods(config: DINOv3Config) -> np.ndarray:
    """The official code's periods (head_dim / 4,) float32, as its `_init_weights` computes them in float32."""
    quarter = config.head_dim // 4
    if config.rope_theta is not None:
        exponents = 2 * np.arange(quarter, dtype=np.float32) / np.float32(config.head_dim // 2)
        return np.power(np.float32(config.rope_theta), exponents).astype(np.float32)
    base = np.float32(config.rope_max_period / config.rope_min_period)
    periods = np.power(base, np.linspace(0, 1, quarter, dtype=np.float32)) / base
    return (periods * np.float32(config.rope_max_period)).astype(np.float32)


def rope_inv_freq(config: DINOv3Config) -> np.ndarray:
    """transformers' `inv_freq` = 1 / theta^(arange(0, 1, 4 / head_dim)), float32."""
    if config.rope_theta is None:
        return (np.float32(1) / rope_periods(config)).astype(np.float32)
    exponents = np.arange(0, 1, 4 / config.head_dim).astype(np.float32)
    if exponents.shape[0] != config.head_dim // 4:
        raise ValueError(f"RoPE: {exponents.shape[0]} frequencies for head size {config.head_dim}")
    return (np.float32(1) / np.power(np.float32(config.rope_theta), exponents)).astype(np.float32)


def patch_coords(grid: tuple[int, int], normalize: str = "separate"):
    """(h * w, 2) patch centres (y, x) in [-1, 1] (row-major), float32."""
    h, w = grid
    denom = {"separate": (h, w), "min": (min(h, w),) * 2, "max": (max(h, w),) * 2}[normalize]
    ys = jnp.arange(0.5, h, dtype=jnp.float32) / jnp.float32(denom[0])
    xs = jnp.arange(0.5, w, dtype=jnp.float32) / jnp.float32(denom[1])
    coords = jnp.stack(jnp.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(h * w, 2)
    return 2.0 * coords - 1.0


def augment_coords(coords, rng, shift=None, jitter=None, rescale=None):
    """Upstream's training-time augmentation: + U(-shift, shift) per axis; * exp(U(-log j, log j)) per axis;
    * exp(U(-log r, log r)) for both axes. One draw for the whole batch."""
    k_shift, k_jitter, k_rescale = jax.random.split(rng, 3)
    if shift is not None:
        coords = coords + jax.random.uniform(k_shift, (1, 2), jnp.float32, -shift, shift)
    if jitter is not None:
        span = float(np.log(jitter))
        coords = coords * jnp.exp(jax.random.uniform(k_jitter, (1, 2), jnp.float32, -span, span))
    if rescale is not None:
        span = float(np.log(rescale))
        coords = coords * jnp.exp(jax.random.uniform(k_rescale, (1,), jnp.float32, -span, span))
    return coords


def rope_angles(coords, inv_freq=None, periods=None):
    """(h * w, head_dim) angles: 2 pi * coord * inv_freq (transformers) or 2 pi * coord / period (official), y pairs
    then x pairs, tiled twice."""
    scaled = jnp.float32(2 * math.pi) * coords[:, :, None]
    angles = scaled * inv_freq[None, None, :] if periods is None else scaled / periods[None, None, :]
    angles = angles.reshape(coords.shape[0], -1)
    return jnp.tile(angles, (1, 2))


def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x, cos, sin):
    """Rotate the patch tokens (the last cos.shape[0] of axis -2) of (B, heads, T, head_dim); CLS and registers
    (the prefix) pass unchanged. Computed in float32, returned in x's dtype."""
    prefix = x.shape[-2] - cos.shape[0]
    head, patches = x[..., :prefix, :], x[..., prefix:, :].astype(jnp.float32)
    rotated = patches * cos + rotate_half(patches) * sin
    return jnp.concatenate([head, rotated.astype(x.dtype)], axis=-2)


# ------------------------------------------------------------------------------------------------ the network


class RopeAttention(Part):
    """Multi-head self-attention with separate q / k / v projections (transformers' q_proj, k_proj, v_proj, o_proj;
    the official fused qkv is split at conversion) and RoPE on the patch tokens' queries and keys."""

    def setup(self):
        c = self.config
        self.q_proj = dense(c.width, c.query_bias, self.dtype)
        self.k_proj = dense(c.width, c.key_bias, self.dtype)
        self.v_proj = dense(c.width, c.value_bias, self.dtype)
        self.o_proj = dense(c.width, c.proj_bias, self.dtype)

    def _heads(self, x, cos, sin):
        """(q, k, v) as (B, heads, T, head_dim), q and k rotated."""
        batch, tokens, _ = x.shape
        c = self.config

        def split(y):
            return y.reshape(batch, tokens, c.num_heads, c.head_dim).transpose(0, 2, 1, 3)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def __call__(self, x, cos, sin):
        batch, tokens, dim = x.shape
        q, k, v = self._heads(x, cos, sin)
        out = None
        if use_cudnn_attention(q.dtype, self.config.head_dim):
            out = cudnn_attention(jnp.stack([q, k, v], axis=2).transpose(0, 3, 2, 1, 4))
        if out is None:
            out = jnp.transpose(head_major_attention(q, k, v), (0, 2, 1, 3))
        return self.o_proj(out.reshape(batch, tokens, dim))

    def attention_probabilities(self, x, cos, sin):
        """(B, T, T) softmax(q k^T / sqrt(d)) averaged over the heads, float32 (for attention rollout)."""
        q, k, _ = self._heads(x, cos, sin)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)
        return jax.nn.softmax(scores * self.config.head_dim ** -0.5, axis=-1).mean(axis=1)


class GatedMlp(Part):
    """w3(act(w1 x) * w2 x) (transformers' gate_proj, up_proj, down_proj)."""

    @nn.compact
    def __call__(self, x):
        c = self.config
        hidden = ACTIVATIONS[c.act](dense(c.mlp_hidden, c.mlp_bias, self.dtype, "w1")(x)) * \
            dense(c.mlp_hidden, c.mlp_bias, self.dtype, "w2")(x)
        return dense(c.width, c.mlp_bias, self.dtype, "w3")(hidden)


def mlp(config: DINOv3Config, dtype) -> nn.Module:
    """fc2(act(fc1 x)), or the gated MLP."""
    if config.gated_mlp:
        return GatedMlp(config, dtype, name="mlp")
    return Mlp(config.mlp_hidden, config.mlp_bias, dtype, ACTIVATIONS[config.act], name="mlp")


class Block(Part):
    @nn.compact
    def __call__(self, x, cos, sin):
        c = self.config
        y = RopeAttention(c, self.dtype, name="attn")(layer_norm(c.norm_eps, "norm1", self.dtype)(x), cos, sin)
        x = x + (LayerScale(name="ls1")(y) if c.layerscale else y)
        y = mlp(c, self.dtype)(layer_norm(c.norm_eps, "norm2", self.dtype)(x))
        return x + (LayerScale(name="ls2")(y) if c.layerscale else y)


class DINOv3ViT(Backbone):
    """Returns the transformers outputs (`last_hidden_state`, `pooler_output`), the official ones (`x_norm_clstoken`,
    `x_storage_tokens`, `x_norm_patchtokens`, `x_prenorm`), `linear_head_input` (the final-normed CLS) and
    `attention_head_input` (the patch tokens before the final norm, as for DINOv2)."""

    def rope(self, grid: tuple[int, int], train: bool):
        c = self.config
        coords = patch_coords(grid, c.rope_normalize)
        if train and any(v is not None for v in (c.rope_shift, c.rope_jitter, c.rope_rescale)):
            if not self.has_rng("dropout"):
                raise ValueError("dinov3: train=True jitters the RoPE coordinates (rope_shift / rope_jitter / "
                                 "rope_rescale) and needs the `dropout` rng stream")
            coords = augment_coords(coords, self.make_rng("dropout"), c.rope_shift, c.rope_jitter, c.rope_rescale)
        if c.rope_stored_periods:
            periods = self.variable("rope", "periods", lambda: jnp.asarray(rope_periods(c))).value
            angles = rope_angles(coords, periods=periods.astype(jnp.float32))
        else:
            angles = rope_angles(coords, inv_freq=jnp.asarray(rope_inv_freq(c)))
        return jnp.cos(angles), jnp.sin(angles)

    @nn.compact
    def forward(self, images, train):
        c = self.config
        x, grid = patch_embed(images, c, self.dtype)
        batch = x.shape[0]
        prefix = [self.param("cls_token", nn.initializers.normal(0.02), (1, 1, c.width))]
        if c.num_registers:
            prefix.append(self.param("reg_tokens", nn.initializers.normal(0.02), (1, c.num_registers, c.width)))
        prefix = [jnp.broadcast_to(t.astype(x.dtype), (batch, *t.shape[1:])) for t in prefix]
        x = jnp.concatenate([*prefix, x], axis=1)
        cos, sin = self.rope(grid, train)
        block = nn.remat(Block) if c.remat else Block
        for i in range(c.depth):
            x = block(c, self.dtype, name=f"blocks_{i}")(x, cos, sin)
        x_norm = layer_norm(c.norm_eps, "norm", self.dtype)(x)
        first_patch = 1 + c.num_registers
        cls = x_norm[:, 0]
        return {"last_hidden_state": x_norm, "pooler_output": cls, "x_norm_clstoken": cls,
                "x_storage_tokens": x_norm[:, 1:first_patch], "x_norm_patchtokens": x_norm[:, first_patch:],
                "x_prenorm": x, "linear_head_input": cls, "attention_head_input": x[:, first_patch:]}


# ------------------------------------------------------------------------------------------------ contract facts

EMBEDDINGS = r"(patch_embed|cls_token|reg_tokens)(/|$)"


def layers(config: DINOv3Config) -> list[str]:
    """The embeddings, then `blocks_0` ... `blocks_{depth-1}`; the final norm comes after."""
    return [EMBEDDINGS] + [f"blocks_{i}/" for i in range(config.depth)]


def lora_targets(config: DINOv3Config) -> list[str]:
    """The q / k / v projections and the MLP kernels of every block."""
    return [r"blocks_\d+/(attn/(q_proj|k_proj|v_proj)|mlp/(fc1|fc2|w1|w2|w3))/kernel$"]


def max_taps(config: DINOv3Config) -> int:
    return config.depth


def taps(config: DINOv3Config, num_blocks: int, dtype=None):
    """The final-normed CLS of the last n blocks (the official `get_intermediate_layers(n, norm=True)`, in block
    order) and the mean of the last block's normed patch tokens (registers excluded), like DINOv2's."""
    model = DINOv3ViT(config, dtype)
    first_patch = 1 + config.num_registers
    names = [f"blocks_{i}" for i in range(config.depth - num_blocks, config.depth)]

    def fn(variables, images):
        blocks_only = lambda m, method: isinstance(m, Block) and method == "__call__"  # noqa: E731
        _, state = model.apply(variables, images, mutable=["intermediates"], capture_intermediates=blocks_only)
        norm = layer_norm(config.norm_eps, None, dtype)
        normed = [norm.apply({"params": variables["params"]["norm"]}, state["intermediates"][n]["__call__"][0])
                  for n in names]
        return {"cls": jnp.stack([x[:, 0] for x in normed], axis=1).astype(jnp.float32),
                "patch_mean": normed[-1][:, first_patch:].mean(axis=1).astype(jnp.float32)}
    return fn
