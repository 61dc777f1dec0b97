"""Key tables, config reader and variants for torchvision DenseNet (`torchvision.models.densenet.DenseNet`).

Two namings of the same weights are read:
- `torchvision_legacy`: the official files `densenet121-a639ec97.pth` ... `densenet201-c1103571.pth` (ported from
  LuaTorch), whose dense layers say `norm.1`, `conv.1`, `norm.2`, `conv.2` and which hold no `num_batches_tracked`;
  torchvision renames them at load time (`densenet._load_state_dict`);
- `torchvision`: `model.state_dict()` of a torchvision DenseNet (`norm1`, `conv1`, ..., with `num_batches_tracked`).
Keys outside the dense layers are the same in both.
"""

from __future__ import annotations

from medjax.conversion import CheckpointError, Converter, Format, conv_rules, dense_rules
from medjax.models.densenet.model import FAMILY, DenseNetConfig
from medjax.models.resnet.convert import IGNORE, IGNORED, bn_rules, check_torchvision_keys


def rules(legacy: bool) -> list:
    """The key table; `legacy`: the dense layers' `norm.1`-style names of the official files."""
    sep = "." if legacy else ""
    layer, out = "features.denseblock{i}.denselayer{j}", "denseblock{i}/denselayer{j}"
    return [
        *conv_rules("features.conv0", "conv0", bias=False),
        *bn_rules("features.norm0", "norm0"),
        *bn_rules(f"{layer}.norm{sep}1", f"{out}/norm1"),
        *conv_rules(f"{layer}.conv{sep}1", f"{out}/conv1", bias=False),
        *bn_rules(f"{layer}.norm{sep}2", f"{out}/norm2"),
        *conv_rules(f"{layer}.conv{sep}2", f"{out}/conv2", bias=False),
        *bn_rules("features.transition{i}.norm", "transition{i}/norm"),
        *conv_rules("features.transition{i}.conv", "transition{i}/conv", bias=False),
        *bn_rules("features.norm5", "norm5"),
        *dense_rules("classifier", "classifier"),
    ]


FORMATS = [
    Format("torchvision_legacy", FAMILY, rules(legacy=True),
           r"features\.denseblock\d+\.denselayer\d+\.(norm|conv)\.[12]\.weight", ignore=IGNORE),
    Format("torchvision", FAMILY, rules(legacy=False),
           r"features\.denseblock\d+\.denselayer\d+\.(norm|conv)[12]\.weight", ignore=IGNORE),
]

# ------------------------------------------------------------------------------------------------ config

_KW = {"growth_rate", "block_config", "num_init_features", "bn_size", "drop_rate", "num_classes", "memory_efficient"}


def densenet_config(kw: dict) -> DenseNetConfig:
    """`DenseNet(**kwargs)` arguments (upstream defaults where absent) -> DenseNetConfig. `memory_efficient`
    (gradient checkpointing) does not change the network and is accepted."""
    check_torchvision_keys(kw, _KW, FAMILY)
    try:
        return DenseNetConfig(growth_rate=int(kw.get("growth_rate", 32)),
                              block_config=tuple(kw.get("block_config", (6, 12, 24, 16))),
                              num_init_features=int(kw.get("num_init_features", 64)), bn_size=int(kw.get("bn_size", 4)),
                              drop_rate=float(kw.get("drop_rate", 0.0)), num_classes=int(kw.get("num_classes", 1000)))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"densenet config: {e}") from e


# ------------------------------------------------------------------------------------------------ variants

def _variant(growth_rate: int, block_config: list[int], num_init_features: int) -> tuple[str, dict]:
    return FAMILY, {"growth_rate": growth_rate, "block_config": block_config, "num_init_features": num_init_features}


VARIANTS = {  # torchvision.models names; the official files hold the ImageNet classifier (1000 classes)
    "densenet121": _variant(32, [6, 12, 24, 16], 64),
    "densenet161": _variant(48, [6, 12, 36, 24], 96),
    "densenet169": _variant(32, [6, 12, 32, 32], 64),
    "densenet201": _variant(32, [6, 12, 48, 32], 64),
}

CONVERTERS = [Converter(FAMILY, FORMATS, densenet_config, IGNORED)]
