"""torchvision VGG (`torchvision.models.vgg.VGG` + `make_layers`: vgg11/13/16/19, with and without BatchNorm) in Flax.

features: per entry of `cfg`, a 3x3 conv (pad 1, with bias) [-> BatchNorm] -> ReLU, or 'M' = MaxPool(2, 2) (floor).
Then AdaptiveAvgPool2d(7) (torch's windows [floor(i n / 7), ceil((i + 1) n / 7)): the identity at 224 px, not plain
replication on smaller maps), flatten in C, H, W order, and the classifier Linear -> ReLU -> Dropout -> Linear ->
ReLU -> Dropout -> Linear. medjax's feature is the penultimate output (classifier[6] replaced by the identity, as the
radiology study does); classifier[6] gives the logits. Parameter names keep torchvision's Sequential indices
(`features_<i>`, `classifier_<i>`).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import linen as nn

from medjax.models.base import Backbone, ConfigMixin
from medjax.models.cnn import adaptive_avg_pool, batch_norm, conv, max_pool, tokens
from medjax.models.layers import dense

FAMILY = "vgg"
POOL_SIZE = 7  # AdaptiveAvgPool2d((7, 7))


@dataclasses.dataclass(frozen=True)
class VGGConfig(ConfigMixin):
    family: str = FAMILY
    cfg: tuple = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")  # vgg16
    batch_norm: bool = False
    dropout: float = 0.5  # of the classifier's two Dropout layers (train only)
    classifier_hidden: int = 4096  # width of classifier[0] and classifier[3]
    num_classes: int = 1000  # classifier[6]; 0: none (medjax's feature is its input)
    in_chans: int = 3
    img_size: int = 224  # the nominal input size (the network takes any size of at least 2^(number of 'M'))

    def __post_init__(self):
        self.check_family(FAMILY)
        cfg = tuple(v if v == "M" else int(v) for v in self.cfg)
        object.__setattr__(self, "cfg", cfg)
        if not any(v != "M" for v in cfg) or any(v != "M" and v < 1 for v in cfg):
            raise ValueError(f"VGGConfig.cfg needs at least one conv and positive widths, got {list(cfg)}")
        if cfg[0] == "M":
            raise ValueError("VGGConfig.cfg must start with a conv (the stem)")
        if self.classifier_hidden < 1 or self.num_classes < 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError("VGGConfig: classifier_hidden >= 1, num_classes >= 0 and dropout in [0, 1) required")

    def layout(self) -> list[tuple[int, str, int]]:
        """torchvision's `features` Sequential: (index, 'conv' | 'bn' | 'relu' | 'pool', channels)."""
        out = []
        for v in self.cfg:
            if v == "M":
                out.append((len(out), "pool", 0))
            else:
                out.append((len(out), "conv", v))
                if self.batch_norm:
                    out.append((len(out), "bn", v))
                out.append((len(out), "relu", v))
        return out

    @property
    def num_channels(self) -> int:
        return [v for v in self.cfg if v != "M"][-1]


class VGG(Backbone):
    """NHWC images -> {features (the penultimate classifier output, (B, classifier_hidden)), logits (classifier[6],
    when num_classes > 0), linear_head_input (= features), attention_head_input (the last feature map, before the
    adaptive pool, as (B, H*W, C) tokens, row-major)}."""

    @nn.compact
    def forward(self, images, train):
        c = self.config
        x = images
        for index, kind, channels in c.layout():
            if kind == "conv":
                x = conv(channels, 3, 1, 1, bias=True, dtype=self.dtype, name=f"features_{index}")(x)
            elif kind == "bn":
                x = batch_norm(self.dtype, f"features_{index}")(x, train)
            elif kind == "relu":
                x = nn.relu(x)
            else:
                x = max_pool(x, 2, 2)
        feature_map = x
        x = adaptive_avg_pool(x, POOL_SIZE)
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # torch.flatten of NCHW: C, H, W order
        for index in (0, 3):
            x = nn.relu(dense(c.classifier_hidden, dtype=self.dtype, name=f"classifier_{index}")(x))
            if c.dropout > 0:
                x = nn.Dropout(c.dropout, deterministic=not train)(x)  # the `dropout` rng stream
        out = {"features": x, "linear_head_input": x, "attention_head_input": tokens(feature_map)}
        if c.num_classes:
            out["logits"] = dense(c.num_classes, dtype=self.dtype, name="classifier_6")(x)
        return out


def layers(config: VGGConfig) -> list[str]:
    """Network order: layer 0 is the first conv (with its BatchNorm), blocks 1..L-1 are the other convs (each with
    its BatchNorm). The classifier's Dense layers come after."""
    out = []
    for index, kind, _ in config.layout():
        if kind == "conv":
            out.append(f"(features_{index}|features_{index + 1})/" if config.batch_norm else f"features_{index}/")
    return out


def lora_targets(config: VGGConfig) -> list[str]:
    return []
