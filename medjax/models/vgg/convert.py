"""Key table, config reader and variants for torchvision VGG (`torchvision.models.vgg.VGG` + `make_layers`).

Files are plain state dicts (`vgg16-397923af.pth`, `vgg16_bn-6c64b313.pth`, ...). Keys keep torchvision's Sequential
indices: `features.<i>` (a conv, or in the `_bn` models the BatchNorm after it) and `classifier.0/3/6`.
"""

from __future__ import annotations

import re

from medjax.conversion import CheckpointError, Converter, Format, Rule, conv, dense_rules, norm_rules
from medjax.models.resnet.convert import IGNORE, IGNORED, check_torchvision_keys
from medjax.models.vgg.model import FAMILY, VGGConfig

_RUNNING_STAT = re.compile(r"features\.(\d+)\.running_(mean|var)")


class VGGFormat(Format):
    """`features.<i>.weight` is a conv kernel, or a BatchNorm weight in the `_bn` models: the key alone does not say
    which, the file does (a BatchNorm has running statistics). `matches`, which the converter calls on the file's
    whole key set before renaming anything, records those indices; the key table then maps their weight and bias to
    the BatchNorm by their exact names, ahead of the generic conv rules. The table is therefore the last file's: one
    conversion at a time per process, as `python -m converters` runs. (A rank condition on `medjax.conversion.Rule`
    would make this stateless; the engine's table has none.)"""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.generic_rules, self.norm_indices = list(self.rules), []

    def matches(self, keys) -> bool:
        keys = list(keys)
        self.norm_indices = sorted({int(m[1]) for k in keys if (m := _RUNNING_STAT.fullmatch(self.normalise(k) or ""))})
        self.rules = [r for i in self.norm_indices for r in norm_rules(f"features.{i}", f"features_{i}")]
        self.rules += self.generic_rules
        return super().matches(keys)


def conv_kernel(a):
    """conv's OIHW -> HWIO; any other rank is passed on, for the shape check to name the key."""
    return conv(a) if a.ndim == 4 else a


RULES = [
    Rule("features.{i}.weight", "features_{i}/kernel", conv_kernel),
    Rule("features.{i}.bias", "features_{i}/bias"),
    Rule("features.{i}.running_mean", "batch_stats:features_{i}/mean"),
    Rule("features.{i}.running_var", "batch_stats:features_{i}/var"),
    *dense_rules("classifier.{i}", "classifier_{i}"),
    # never reached by a key (the conv rules come first); they name the checkpoint key of a missing BatchNorm
    *norm_rules("features.{i}", "features_{i}"),
]

FORMATS = [VGGFormat("torchvision", FAMILY, RULES, r"features\.0\.weight", ignore=IGNORE)]

# ------------------------------------------------------------------------------------------------ config

_KW = {"cfg", "batch_norm", "num_classes", "init_weights", "dropout", "classifier_hidden"}


def vgg_config(kw: dict) -> VGGConfig:
    """`VGG(make_layers(cfg, batch_norm), num_classes, init_weights, dropout)` arguments -> VGGConfig.
    `classifier_hidden` (not an upstream argument; default 4096) is the width of classifier[0] and classifier[3],
    for files whose classifier was rebuilt narrower. `init_weights` only changes the initialisation."""
    check_torchvision_keys(kw, _KW, FAMILY)
    if "cfg" not in kw:
        raise CheckpointError("vgg config: 'cfg' is required (the make_layers list, e.g. [64, 'M', 128, 'M', ...])")
    cfg = kw["cfg"]
    bad = [v for v in (cfg if isinstance(cfg, (list, tuple)) else [cfg])
           if v != "M" and not (isinstance(v, int) and not isinstance(v, bool) and v > 0)]
    if not isinstance(cfg, (list, tuple)) or bad:
        raise CheckpointError(f"vgg config: cfg must be a list of positive ints and 'M', got {cfg!r}")
    try:
        return VGGConfig(cfg=tuple(cfg), batch_norm=bool(kw.get("batch_norm", False)),
                         dropout=float(kw.get("dropout", 0.5)),
                         classifier_hidden=int(kw.get("classifier_hidden", 4096)),
                         num_classes=int(kw.get("num_classes", 1000)))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"vgg config: {e}") from e


# ------------------------------------------------------------------------------------------------ variants

CFGS = {  # torchvision.models.vgg.cfgs
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}

VARIANTS = {  # torchvision.models names; the official files hold the ImageNet classifier[6] (1000 classes)
    f"vgg{depth}{suffix}": (FAMILY, {"cfg": CFGS[letter], "batch_norm": bool(suffix)})
    for depth, letter in ((11, "A"), (13, "B"), (16, "D"), (19, "E")) for suffix in ("", "_bn")
}

CONVERTERS = [Converter(FAMILY, FORMATS, vgg_config, IGNORED)]
