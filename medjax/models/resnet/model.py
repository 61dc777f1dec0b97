"""torchvision ResNet (`torchvision.models.resnet.ResNet`: resnet18 ... resnet152, ResNeXt, Wide ResNet) in Flax.

The "v1.5" network torchvision ships: in a bottleneck the stride sits on the 3x3 conv (conv2), not on the first 1x1;
the shortcut of a block that changes the shape is a strided 1x1 conv + BatchNorm (`downsample.0`, `downsample.1`).
`replace_stride_with_dilation` turns a stage's stride into dilation of its 3x3 convs, as upstream.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import linen as nn

from medjax.models.base import Backbone, ConfigMixin
from medjax.models.cnn import batch_norm, conv, max_pool, tokens
from medjax.models.layers import dense

FAMILY = "resnet"
BLOCKS = ("basic", "bottleneck")
EXPANSION = {"basic": 1, "bottleneck": 4}
STAGE_PLANES = (64, 128, 256, 512)


@dataclasses.dataclass(frozen=True)
class ResNetConfig(ConfigMixin):
    family: str = FAMILY
    block: str = "bottleneck"  # "basic" (resnet18/34) or "bottleneck" (resnet50/101/152, ResNeXt, Wide ResNet)
    layers: tuple[int, int, int, int] = (3, 4, 6, 3)  # blocks per stage
    groups: int = 1  # of the bottleneck's 3x3 conv (ResNeXt)
    width_per_group: int = 64  # bottleneck width = int(planes * width_per_group / 64) * groups
    replace_stride_with_dilation: tuple[bool, bool, bool] = (False, False, False)  # stages 2, 3, 4
    num_classes: int = 1000  # the ImageNet `fc`; 0: none (medjax only needs its input)
    in_chans: int = 3
    img_size: int = 224  # the nominal input size (the network takes any size)

    def __post_init__(self):
        self.check_family(FAMILY, "layers")
        object.__setattr__(self, "replace_stride_with_dilation",
                           tuple(bool(d) for d in self.replace_stride_with_dilation))
        if self.block not in BLOCKS:
            raise ValueError(f"ResNetConfig.block must be one of {BLOCKS}, got {self.block!r}")
        if len(self.layers) != 4 or min(self.layers) < 1:
            raise ValueError(f"ResNetConfig.layers must be 4 positive block counts, got {self.layers}")
        if len(self.replace_stride_with_dilation) != 3:
            raise ValueError("ResNetConfig.replace_stride_with_dilation must have 3 entries (stages 2-4), got "
                             f"{self.replace_stride_with_dilation}")
        if self.block == "basic" and (self.groups != 1 or self.width_per_group != 64):
            raise ValueError("ResNetConfig: the basic block supports only groups=1 and width_per_group=64 "
                             "(as upstream)")
        if self.block == "basic" and any(self.replace_stride_with_dilation):
            raise ValueError("ResNetConfig: dilation is not supported with the basic block (as upstream)")
        if self.groups < 1 or self.width_per_group < 1 or self.num_classes < 0:
            raise ValueError("ResNetConfig: groups and width_per_group must be >= 1, num_classes >= 0")

    @property
    def num_features(self) -> int:
        return STAGE_PLANES[-1] * EXPANSION[self.block]

    def plan(self) -> list[list[tuple[int, int, int, bool]]]:
        """Per stage, per block: (planes, stride, dilation, has_downsample), following upstream's `_make_layer`."""
        out, inplanes, dilation = [], 64, 1
        expansion = EXPANSION[self.block]
        for stage, (planes, depth) in enumerate(zip(STAGE_PLANES, self.layers)):
            stride, previous = (1 if stage == 0 else 2), dilation
            if stage > 0 and self.replace_stride_with_dilation[stage - 1]:
                dilation *= stride
                stride = 1
            blocks = [(planes, stride, previous, stride != 1 or inplanes != planes * expansion)]
            blocks += [(planes, 1, dilation, False)] * (depth - 1)
            inplanes = planes * expansion
            out.append(blocks)
        return out


class BasicBlock(nn.Module):
    planes: int
    stride: int = 1
    downsample: bool = False
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        out = conv(self.planes, 3, self.stride, 1, dtype=self.dtype, name="conv1")(x)
        out = nn.relu(batch_norm(self.dtype, "bn1")(out, train))
        out = conv(self.planes, 3, 1, 1, dtype=self.dtype, name="conv2")(out)
        out = batch_norm(self.dtype, "bn2")(out, train)
        return nn.relu(out + shortcut(x, self.planes, self.stride, self.downsample, self.dtype, train))


class Bottleneck(nn.Module):
    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    groups: int = 1
    width_per_group: int = 64
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        width = int(self.planes * (self.width_per_group / 64.0)) * self.groups
        out = conv(width, 1, dtype=self.dtype, name="conv1")(x)
        out = nn.relu(batch_norm(self.dtype, "bn1")(out, train))
        out = conv(width, 3, self.stride, self.dilation, self.dilation, self.groups, dtype=self.dtype,
                   name="conv2")(out)  # v1.5: the stride is here
        out = nn.relu(batch_norm(self.dtype, "bn2")(out, train))
        out = conv(self.planes * 4, 1, dtype=self.dtype, name="conv3")(out)
        out = batch_norm(self.dtype, "bn3")(out, train)
        return nn.relu(out + shortcut(x, self.planes * 4, self.stride, self.downsample, self.dtype, train))


def shortcut(x, features: int, stride: int, downsample: bool, dtype, train: bool):
    """The identity, or upstream's `downsample` = Sequential(conv1x1(stride), BatchNorm2d), built in the caller's
    scope as `downsample_conv` / `downsample_bn`."""
    if not downsample:
        return x
    x = conv(features, 1, stride, dtype=dtype, name="downsample_conv")(x)
    return batch_norm(dtype, "downsample_bn")(x, train)


class ResNet(Backbone):
    """NHWC images -> {features (the pooled (B, C) input of `fc`), logits (`fc`, when num_classes > 0),
    linear_head_input (= features), attention_head_input (layer4's positions as (B, H*W, C) tokens, row-major)}."""

    @nn.compact
    def forward(self, images, train):
        c = self.config
        x = conv(64, 7, 2, 3, dtype=self.dtype, name="conv1")(images)
        x = nn.relu(batch_norm(self.dtype, "bn1")(x, train))
        x = max_pool(x, 3, 2, 1)
        for stage, blocks in enumerate(c.plan(), start=1):
            for j, (planes, stride, dilation, downsample) in enumerate(blocks):
                name = f"layer{stage}_{j}"
                if c.block == "basic":
                    x = BasicBlock(planes, stride, downsample, self.dtype, name=name)(x, train)
                else:
                    x = Bottleneck(planes, stride, dilation, downsample, c.groups, c.width_per_group, self.dtype,
                                   name=name)(x, train)
        features = x.mean(axis=(1, 2))  # AdaptiveAvgPool2d((1, 1)) + flatten
        out = {"features": features, "linear_head_input": features, "attention_head_input": tokens(x)}
        if c.num_classes:
            out["logits"] = dense(c.num_classes, dtype=self.dtype, name="fc")(features)
        return out


def layers(config: ResNetConfig) -> list[str]:
    """The stem (conv1, bn1), then every residual block in network order (`layer<s>_<j>`, its downsample included);
    `fc` comes after."""
    return ["(conv1|bn1)/"] + [f"layer{s}_{j}/" for s, depth in enumerate(config.layers, start=1)
                               for j in range(depth)]


def lora_targets(config: ResNetConfig) -> list[str]:
    return []  # no Dense layers inside the blocks
