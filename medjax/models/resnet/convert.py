"""Key table, config reader and variants for torchvision ResNet (`torchvision.models.resnet.ResNet`).

Files are plain state dicts (`resnet50-*.pth`, `torch.save(model.state_dict())`). BatchNorm running statistics land
in `batch_stats`; `num_batches_tracked` (present in recent files, absent in old ones) is ignored: torch's BatchNorm
with the default momentum never reads it.
"""

from __future__ import annotations

from medjax.conversion import (
    INERT_KEYS,
    CheckpointError,
    Converter,
    Format,
    Rule,
    check_keys,
    conv_rules,
    dense_rules,
    norm_rules,
)
from medjax.models.resnet.model import FAMILY, ResNetConfig


def bn_rules(src: str, dst: str) -> list[Rule]:
    """BatchNorm2d: weight/bias -> params scale/bias; running_mean/var -> batch_stats mean/var."""
    return norm_rules(src, dst) + [Rule(f"{src}.running_mean", f"batch_stats:{dst}/mean"),
                                   Rule(f"{src}.running_var", f"batch_stats:{dst}/var")]


IGNORE = [r"(.*\.)?num_batches_tracked"]

_BLOCK, _OUT = "layer{i}.{j}", "layer{i}_{j}"
RULES = [
    *conv_rules("conv1", "conv1", bias=False),
    *bn_rules("bn1", "bn1"),
    *[r for n in (1, 2, 3) for r in conv_rules(f"{_BLOCK}.conv{n}", f"{_OUT}/conv{n}", bias=False)
      + bn_rules(f"{_BLOCK}.bn{n}", f"{_OUT}/bn{n}")],
    *conv_rules(f"{_BLOCK}.downsample.0", f"{_OUT}/downsample_conv", bias=False),
    *bn_rules(f"{_BLOCK}.downsample.1", f"{_OUT}/downsample_bn"),
    *dense_rules("fc", "fc"),
]

FORMATS = [Format("torchvision", FAMILY, RULES, r"layer1\.0\.conv1\.weight", ignore=IGNORE)]

# ------------------------------------------------------------------------------------------------ config

def check_torchvision_keys(kw: dict, known: set, family: str):
    """Refuse, by name, every argument the torchvision constructor does not take (the settings other families'
    readers tolerate as inert, `drop_path_rate` and the like, included) and a config written for another family."""
    check_keys(kw, known, f"{family} config")
    foreign = sorted((set(kw) & INERT_KEYS) - set(known))
    if foreign:
        raise CheckpointError(f"{family} config: unsupported constructor arguments {foreign}; supported: "
                              f"{sorted(known)}")
    if kw.get("family", family) != family:
        raise CheckpointError(f"{family} config: the file describes a {kw['family']!r} model, not a {family} one")


_BLOCK_NAMES = {"BasicBlock": "basic", "Bottleneck": "bottleneck"}
_KW = {"block", "layers", "num_classes", "zero_init_residual", "groups", "width_per_group",
       "replace_stride_with_dilation", "norm_layer"}


def resnet_config(kw: dict) -> ResNetConfig:
    """`ResNet(block, layers, **kwargs)` arguments (block as the class name "Bottleneck" / "BasicBlock") ->
    ResNetConfig. `zero_init_residual` only changes the initialisation and is accepted."""
    check_torchvision_keys(kw, _KW, FAMILY)
    for required in ("block", "layers"):
        if required not in kw:
            raise CheckpointError(f"resnet config: {required!r} is required (ResNet(block, layers, ...))")
    block = kw["block"]
    if block not in _BLOCK_NAMES:
        raise CheckpointError(f"resnet config: block={block!r}; supported: {sorted(_BLOCK_NAMES)} (torchvision's "
                              "torchvision.models.resnet block classes)")
    if kw.get("norm_layer") is not None:
        raise CheckpointError(f"resnet config: norm_layer={kw['norm_layer']!r}; only the default (None: BatchNorm2d) "
                              "is supported")
    dilation = kw.get("replace_stride_with_dilation") or [False, False, False]
    try:
        return ResNetConfig(block=_BLOCK_NAMES[block], layers=tuple(kw["layers"]), groups=int(kw.get("groups", 1)),
                            width_per_group=int(kw.get("width_per_group", 64)),
                            replace_stride_with_dilation=tuple(dilation),
                            num_classes=int(kw.get("num_classes", 1000)))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"resnet config: {e}") from e


# ------------------------------------------------------------------------------------------------ variants

def _variant(block: str, layers: list[int], **kw) -> tuple[str, dict]:
    return FAMILY, {"block": block, "layers": layers, **kw}


VARIANTS = {  # torchvision.models names; the official files hold the ImageNet fc (1000 classes)
    "resnet18": _variant("BasicBlock", [2, 2, 2, 2]),
    "resnet34": _variant("BasicBlock", [3, 4, 6, 3]),
    "resnet50": _variant("Bottleneck", [3, 4, 6, 3]),
    "resnet101": _variant("Bottleneck", [3, 4, 23, 3]),
    "resnet152": _variant("Bottleneck", [3, 8, 36, 3]),
    "resnext50_32x4d": _variant("Bottleneck", [3, 4, 6, 3], groups=32, width_per_group=4),
    "resnext101_32x8d": _variant("Bottleneck", [3, 4, 23, 3], groups=32, width_per_group=8),
    "resnext101_64x4d": _variant("Bottleneck", [3, 4, 23, 3], groups=64, width_per_group=4),
    "wide_resnet50_2": _variant("Bottleneck", [3, 4, 6, 3], width_per_group=128),
    "wide_resnet101_2": _variant("Bottleneck", [3, 4, 23, 3], width_per_group=128),
}

IGNORED = "num_batches_tracked (BatchNorm's step counter, unused with a fixed momentum)"

CONVERTERS = [Converter(FAMILY, FORMATS, resnet_config, IGNORED)]
