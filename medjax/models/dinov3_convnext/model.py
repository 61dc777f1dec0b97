"""The DINOv3 ConvNeXts (distilled from DINOv3 ViT-7B) in Flax: transformers' `DINOv3ConvNextModel` and the official
facebookresearch/dinov3 `ConvNeXt`.

Four stages; each begins with its downsampling (stage 1: a 4x4 stride-4 convolution then LayerNorm; later stages:
LayerNorm then a 2x2 stride-2 convolution) and runs ConvNeXt blocks: 7x7 depthwise convolution, LayerNorm, Dense(4C),
GELU, Dense(C), per-channel scale `gamma` (LayerScale), residual. The output, as both upstreams build it: the global
average of the last map is prepended to its flattened positions as a "CLS" token and the sequence goes through the
final LayerNorm: `pooler_output` / `x_norm_clstoken` is its first token. Every LayerNorm uses `norm_eps` (1e-6). NHWC.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import linen as nn

from medjax.models.base import Backbone, ConfigMixin, Part
from medjax.models.family import staged_layers
from medjax.models.layers import LayerScale, dense, gelu, layer_norm

FAMILY = "dinov3_convnext"
ACTIVATIONS = {"gelu": gelu, "relu": nn.relu, "silu": nn.silu}


@dataclasses.dataclass(frozen=True)
class DINOv3ConvNextConfig(ConfigMixin):
    family: str = FAMILY
    dims: tuple[int, ...] = (96, 192, 384, 768)
    depths: tuple[int, ...] = (3, 3, 9, 3)
    in_chans: int = 3
    norm_eps: float = 1e-6
    layerscale: bool = True  # gamma (layer_scale_init_value > 0)
    act: str = "gelu"
    img_size: int = 224  # the nominal input size (the network takes any size of at least 32 px)

    def __post_init__(self):
        self.check_family(FAMILY, "dims", "depths")
        if len(self.dims) != len(self.depths) or not self.dims or min(self.depths) < 1:
            raise ValueError(f"DINOv3ConvNextConfig: dims {self.dims} and depths {self.depths} must have the same "
                             "length, every stage with >= 1 block")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"DINOv3ConvNextConfig: act {self.act!r} is not one of {sorted(ACTIVATIONS)}")

    @property
    def min_input(self) -> int:
        return 4 * 2 ** (len(self.dims) - 1)


class ConvNextBlock(Part):
    """x + gamma * pwconv2(act(pwconv1(norm(dwconv(x))))), `dim` channels."""

    dim: int = dataclasses.field(kw_only=True)

    @nn.compact
    def __call__(self, x):
        c = self.config
        y = nn.Conv(self.dim, (7, 7), padding=3, feature_group_count=self.dim, dtype=self.dtype, name="dwconv")(x)
        y = layer_norm(c.norm_eps, "norm", self.dtype)(y)
        y = ACTIVATIONS[c.act](dense(4 * self.dim, True, self.dtype, "pwconv1")(y))
        y = dense(self.dim, True, self.dtype, "pwconv2")(y)
        if c.layerscale:
            y = LayerScale(name="gamma")(y)
        return x + y


class Stage(Part):
    """The stage's downsampling, then its blocks; returns the stage's NHWC map."""

    index: int = dataclasses.field(kw_only=True)

    @nn.compact
    def __call__(self, x):
        c, i = self.config, self.index
        dim = c.dims[i]
        if i == 0:
            x = nn.Conv(dim, (4, 4), strides=(4, 4), padding="VALID", dtype=self.dtype, name="downsample_conv")(x)
            x = layer_norm(c.norm_eps, "downsample_norm", self.dtype)(x)
        else:
            x = layer_norm(c.norm_eps, "downsample_norm", self.dtype)(x)
            x = nn.Conv(dim, (2, 2), strides=(2, 2), padding="VALID", dtype=self.dtype, name="downsample_conv")(x)
        for j in range(c.depths[i]):
            x = ConvNextBlock(c, self.dtype, dim=dim, name=f"blocks_{j}")(x)
        return x


class DINOv3ConvNext(Backbone):
    """Returns the transformers outputs (`last_hidden_state` = LN([mean; tokens]), `pooler_output`), the official ones
    (`x_norm_clstoken`, `x_norm_patchtokens`, `x_prenorm`: the last map's tokens before the norm),
    `linear_head_input` (the pooled token) and `attention_head_input` (the normed patch tokens)."""

    @nn.compact
    def forward(self, images, train):
        c = self.config
        batch, height, width = images.shape[:3]
        if min(height, width) < c.min_input:
            raise ValueError(f"{FAMILY}: input {height}x{width} px is smaller than {c.min_input} px (the stem's 4x "
                             f"and {len(c.dims) - 1} 2x downsamplings leave no position)")
        x = images
        for i in range(len(c.dims)):
            x = Stage(c, self.dtype, index=i, name=f"stages_{i}")(x)
        tokens = x.reshape(batch, -1, x.shape[-1])
        pooled = x.astype(jnp.float32).mean(axis=(1, 2)).astype(x.dtype)
        normed = layer_norm(c.norm_eps, "norm", self.dtype)(jnp.concatenate([pooled[:, None], tokens], axis=1))
        cls = normed[:, 0]
        return {"last_hidden_state": normed, "pooler_output": cls, "x_norm_clstoken": cls,
                "x_norm_patchtokens": normed[:, 1:], "x_prenorm": tokens, "linear_head_input": cls,
                "attention_head_input": normed[:, 1:]}


# ------------------------------------------------------------------------------------------------ contract facts


def layers(config: DINOv3ConvNextConfig) -> list[str]:
    """The stem (stage 1's downsampling), then every block in network order across the stages; a later stage's
    downsampling goes with the block it feeds (its first), as for VMamba."""
    return staged_layers("stages_0/downsample_", config.depths, "stages_{s}/blocks_{j}/", "stages_{s}/downsample_")


def lora_targets(config: DINOv3ConvNextConfig) -> list[str]:
    """The pointwise (Dense) kernels of every block."""
    return [r"stages_\d+/blocks_\d+/(pwconv1|pwconv2)/kernel$"]


def gradcam_layer(config: DINOv3ConvNextConfig) -> str:
    """The last stage's map, the one the pooled feature averages."""
    return f"stages_{len(config.dims) - 1}"
