"""Key tables, config readers and variants of the DINOv3 ConvNeXts: transformers' `DINOv3ConvNextModel` files (the
gated Hugging Face repos `facebook/dinov3-convnext-{tiny,small,base,large}-pretrain-lvd1689m`) and the official
facebookresearch/dinov3 torch.hub files (`dinov3_convnext_*_pretrain_lvd1689m-<hash>.pth`, a state dict of
`ConvNeXt`). The official state dict holds the final norm twice (`norm.*` and `norms.3.*`, the same module listed
for `get_intermediate_layers`); `norms.*` is ignored.
"""

from __future__ import annotations

from medjax.conversion import CheckpointError, Converter, Format, Rule, check_keys, conv_rules, dense_rules, norm_rules
from medjax.models.dinov3_convnext.model import ACTIVATIONS, FAMILY, DINOv3ConvNextConfig


def _block_rules(src: str, names: dict) -> list[Rule]:
    dst = "stages_{i}/blocks_{j}"
    return [*conv_rules(f"{src}.{names['dwconv']}", f"{dst}/dwconv"),
            *norm_rules(f"{src}.{names['norm']}", f"{dst}/norm"),
            *dense_rules(f"{src}.{names['pwconv1']}", f"{dst}/pwconv1"),
            *dense_rules(f"{src}.{names['pwconv2']}", f"{dst}/pwconv2"),
            Rule(f"{src}.gamma", f"{dst}/gamma/gamma")]


def _downsample_rules(stage0: str, later: str) -> list[Rule]:
    """Stage 1 downsamples conv then norm (`.0`, `.1`), later stages norm then conv; the stage-1 rules come first
    (the first matching rule wins)."""
    return [*conv_rules(f"{stage0}.0", "stages_0/downsample_conv"),
            *norm_rules(f"{stage0}.1", "stages_0/downsample_norm"),
            *norm_rules(f"{later}.0", "stages_{i}/downsample_norm"),
            *conv_rules(f"{later}.1", "stages_{i}/downsample_conv")]


HF_RULES = [
    *_downsample_rules("stages.0.downsample_layers", "stages.{i}.downsample_layers"),
    *_block_rules("stages.{i}.layers.{j}", {"dwconv": "depthwise_conv", "norm": "layer_norm",
                                            "pwconv1": "pointwise_conv1", "pwconv2": "pointwise_conv2"}),
    *norm_rules("layer_norm", "norm"),
]
HUB_RULES = [
    *_downsample_rules("downsample_layers.0", "downsample_layers.{i}"),
    *_block_rules("stages.{i}.{j}", {"dwconv": "dwconv", "norm": "norm", "pwconv1": "pwconv1", "pwconv2": "pwconv2"}),
    *norm_rules("norm", "norm"),
]

FORMATS = [
    Format("dinov3_convnext_transformers", FAMILY, HF_RULES, r"stages\.\d+\.downsample_layers\.\d+\.weight",
           key_fixes=[(r"^model\.stages\.", "stages.")], hf=True),
    Format("dinov3_convnext_hub", FAMILY, HUB_RULES, r"downsample_layers\.\d+\.\d+\.weight",
           ignore=[r"norms\.\d+\.(weight|bias)"]),
]

IGNORED = "hub files: norms.N.* (the final norm listed a second time)"

# ------------------------------------------------------------------------------------------------ configs

_HUB_KW = {"in_chans", "depths", "dims", "layer_scale_init_value", "patch_size", "compact_arch_name", "pretrained",
           "weights", "hash"}  # patch_size only resizes get_intermediate_layers' maps


def hub_config(kw: dict) -> DINOv3ConvNextConfig:
    """`ConvNeXt(**kwargs)` of facebookresearch/dinov3 (upstream defaults where absent)."""
    check_keys(kw, _HUB_KW, "dinov3_convnext hub config")
    depths, dims = list(kw.get("depths", [3, 3, 9, 3])), list(kw.get("dims", [96, 192, 384, 768]))
    if len(depths) != 4 or len(dims) != 4:
        raise CheckpointError(f"dinov3_convnext hub config: the official ConvNeXt has 4 stages; got depths {depths}, "
                              f"dims {dims}")
    return _config(dims, depths, int(kw.get("in_chans", 3)), 1e-6, float(kw.get("layer_scale_init_value", 1e-6)),
                   "gelu", 224)


def transformers_config(cfg: dict) -> DINOv3ConvNextConfig:
    """transformers' DINOv3ConvNextConfig (`dinov3_convnext`); missing keys take the config class's defaults."""
    if cfg.get("model_type") != FAMILY:
        raise CheckpointError(f"transformers config has model_type {cfg.get('model_type')!r}; a {FAMILY} checkpoint "
                              f"needs {FAMILY!r}")
    act = cfg.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"dinov3_convnext transformers config: hidden_act {act!r} is not supported "
                              f"({', '.join(sorted(ACTIVATIONS))})")
    size = cfg.get("image_size", 224)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    return _config(cfg.get("hidden_sizes") or [96, 192, 384, 768], cfg.get("depths") or [3, 3, 9, 3],
                   int(cfg.get("num_channels", 3)), float(cfg.get("layer_norm_eps", 1e-6)),
                   float(cfg.get("layer_scale_init_value", 1e-6)), act, size)


def _config(dims, depths, in_chans, eps, layer_scale, act, img_size) -> DINOv3ConvNextConfig:
    try:
        return DINOv3ConvNextConfig(dims=tuple(dims), depths=tuple(depths), in_chans=in_chans, norm_eps=eps,
                                    layerscale=layer_scale > 0, act=act, img_size=img_size)
    except ValueError as e:
        raise CheckpointError(f"dinov3_convnext config: {e}") from e


def parse_config(cfg: dict) -> DINOv3ConvNextConfig:
    return transformers_config(cfg) if "model_type" in cfg else hub_config(cfg)


# ------------------------------------------------------------------------------------------------ variants

# facebookresearch/dinov3 `dinov3/models/convnext.py` convnext_sizes, as `dinov3/hub/backbones.py` builds them
_SIZES = {"tiny": ([3, 3, 9, 3], [96, 192, 384, 768]), "small": ([3, 3, 27, 3], [96, 192, 384, 768]),
          "base": ([3, 3, 27, 3], [128, 256, 512, 1024]), "large": ([3, 3, 27, 3], [192, 384, 768, 1536])}
VARIANTS = {f"dinov3_convnext_{size}": (FAMILY, {"in_chans": 3, "depths": depths, "dims": dims, "drop_path_rate": 0,
                                                 "layer_scale_init_value": 1e-6})
            for size, (depths, dims) in _SIZES.items()}

CONVERTERS = [Converter(FAMILY, FORMATS, parse_config, IGNORED)]
