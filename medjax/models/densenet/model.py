"""torchvision DenseNet (`torchvision.models.densenet.DenseNet`: densenet121/161/169/201) in Flax.

features = conv0 7x7/2 -> norm0 -> ReLU -> MaxPool(3, 2, 1) -> [dense block -> transition]* -> dense block -> norm5.
A dense layer adds `growth_rate` channels: conv2_3x3(relu(norm2(conv1_1x1(relu(norm1(concat of all earlier maps)))));
a transition halves the channels (floor) with norm -> ReLU -> conv 1x1 -> AvgPool(2, 2) (floor). `norm5` has no ReLU
inside `features`: `DenseNet.forward` applies it afterwards, before the global average pool.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import linen as nn

from medjax.models.base import Backbone, ConfigMixin, Part
from medjax.models.cnn import avg_pool, batch_norm, conv, max_pool, tokens
from medjax.models.layers import dense

FAMILY = "densenet"


@dataclasses.dataclass(frozen=True)
class DenseNetConfig(ConfigMixin):
    family: str = FAMILY
    growth_rate: int = 32
    block_config: tuple[int, ...] = (6, 12, 24, 16)  # dense layers per block
    num_init_features: int = 64
    bn_size: int = 4  # bottleneck width = bn_size * growth_rate
    drop_rate: float = 0.0  # dropout on each dense layer's new features (train only)
    num_classes: int = 1000  # the ImageNet `classifier`; 0: none (medjax only needs its input)
    in_chans: int = 3
    img_size: int = 224  # the nominal input size (the network takes any size)

    def __post_init__(self):
        self.check_family(FAMILY, "block_config")
        if not self.block_config or min(self.block_config) < 1:
            raise ValueError(f"DenseNetConfig.block_config must be positive layer counts, got {self.block_config}")
        if min(self.growth_rate, self.num_init_features, self.bn_size) < 1 or self.num_classes < 0:
            raise ValueError("DenseNetConfig: growth_rate, num_init_features and bn_size must be >= 1, "
                             "num_classes >= 0")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"DenseNetConfig.drop_rate must be in [0, 1), got {self.drop_rate}")

    def block_channels(self) -> list[int]:
        """Channels entering each dense block (the transitions halve them, floor)."""
        out, channels = [], self.num_init_features
        for i, n in enumerate(self.block_config):
            out.append(channels)
            channels += n * self.growth_rate
            if i < len(self.block_config) - 1:
                channels //= 2
        return out

    @property
    def num_features(self) -> int:
        return self.block_channels()[-1] + self.block_config[-1] * self.growth_rate


class DenseLayer(Part):
    """The `growth_rate` new channels of one dense layer (the config's growth_rate, bn_size and drop_rate)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = self.config
        h = nn.relu(batch_norm(self.dtype, "norm1")(x, train))
        h = conv(c.bn_size * c.growth_rate, 1, dtype=self.dtype, name="conv1")(h)
        h = nn.relu(batch_norm(self.dtype, "norm2")(h, train))
        h = conv(c.growth_rate, 3, 1, 1, dtype=self.dtype, name="conv2")(h)
        if c.drop_rate > 0:
            h = nn.Dropout(c.drop_rate, deterministic=not train)(h)  # the `dropout` rng stream
        return h


class DenseBlock(Part):
    num_layers: int = dataclasses.field(kw_only=True)

    @nn.compact
    def __call__(self, x, train: bool = False):
        features = [x]
        for i in range(1, self.num_layers + 1):
            new = DenseLayer(self.config, self.dtype, name=f"denselayer{i}")(jnp.concatenate(features, axis=-1), train)
            features.append(new)
        return jnp.concatenate(features, axis=-1)


class Transition(nn.Module):
    features: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(batch_norm(self.dtype, "norm")(x, train))
        x = conv(self.features, 1, dtype=self.dtype, name="conv")(x)
        return avg_pool(x, 2, 2)


class DenseNet(Backbone):
    """NHWC images -> {features (the (B, C) input of `classifier`: mean of relu(norm5(...))), logits (when
    num_classes > 0), linear_head_input (= features), attention_head_input (relu(norm5) positions as (B, H*W, C)
    tokens, row-major; their mean is `features`)}."""

    @nn.compact
    def forward(self, images, train):
        c = self.config
        x = conv(c.num_init_features, 7, 2, 3, dtype=self.dtype, name="conv0")(images)
        x = nn.relu(batch_norm(self.dtype, "norm0")(x, train))
        x = max_pool(x, 3, 2, 1)
        for b, n in enumerate(c.block_config, start=1):
            x = DenseBlock(c, self.dtype, num_layers=n, name=f"denseblock{b}")(x, train)
            if b < len(c.block_config):
                x = Transition(x.shape[-1] // 2, self.dtype, name=f"transition{b}")(x, train)
        x = nn.relu(batch_norm(self.dtype, "norm5")(x, train))  # the ReLU of DenseNet.forward
        features = x.mean(axis=(1, 2))
        out = {"features": features, "linear_head_input": features, "attention_head_input": tokens(x)}
        if c.num_classes:
            out["logits"] = dense(c.num_classes, dtype=self.dtype, name="classifier")(features)
        return out


def layers(config: DenseNetConfig) -> list[str]:
    """The stem (conv0, norm0), then every dense layer in network order; transition b sits between block b's last
    layer and block b + 1's first and is counted with the layer it feeds. norm5 and the classifier come after."""
    out = ["(conv0|norm0)/"]
    for b, n in enumerate(config.block_config, start=1):
        for i in range(1, n + 1):
            here = f"denseblock{b}/denselayer{i}/"
            out.append(f"(transition{b - 1}/|{here})" if i == 1 and b > 1 else here)
    return out


def lora_targets(config: DenseNetConfig) -> list[str]:
    return []  # no Dense layers inside the blocks
