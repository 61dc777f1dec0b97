"""Key table and config reader for VMamba (MzeroMiko/VMamba `classification/models/vmamba.py::VSSM`).

Supported: the 2024 "v2" classification models, i.e. `forward_type="v05_noz"`, `patchembed_version="v2"`,
`downsample_version="v3"`, LayerNorm (`norm_layer` "ln2d" or "ln": the same network and the same state dict, channel
first or last). Files are upstream training checkpoints, `{'model': state_dict, ...}`; `--ema` takes `model_ema`.
`classifier.head.*` (the ImageNet classifier) is ignored on purpose: medjax exposes the classifier's input.
"""

from __future__ import annotations

from medjax.conversion import CheckpointError, Converter, Format, Rule, check_keys, conv_rules, norm_rules
from medjax.models.vmamba.model import VMambaConfig


def linear2d(a):
    """Linear2d / nn.Linear weight (out, in) -> Dense kernel (in, out); also a 1x1 conv's (out, in, 1, 1)."""
    if a.ndim == 4 and a.shape[2:] == (1, 1):
        a = a[:, :, 0, 0]
    return a.T


_BLOCK, _OP = "layers.{i}.blocks.{j}", "layers_{i}/blocks_{j}"
RULES = [
    *conv_rules("patch_embed.0", "patch_embed/conv1"),
    *norm_rules("patch_embed.2", "patch_embed/norm1"),
    *conv_rules("patch_embed.5", "patch_embed/conv2"),
    *norm_rules("patch_embed.7", "patch_embed/norm2"),
    *norm_rules(f"{_BLOCK}.norm", f"{_OP}/norm"),
    Rule(f"{_BLOCK}.op.in_proj.weight", f"{_OP}/op/in_proj/kernel", linear2d),
    *conv_rules(f"{_BLOCK}.op.conv2d", f"{_OP}/op/conv2d"),  # depthwise (D, 1, k, k) -> (k, k, 1, D); bias if conv_bias
    # the SSM parameters keep upstream's layouts
    Rule(f"{_BLOCK}.op.x_proj_weight", f"{_OP}/op/x_proj_weight"),  # (K, R + 2N, D)
    Rule(f"{_BLOCK}.op.dt_projs_weight", f"{_OP}/op/dt_projs_weight"),  # (K, D, R)
    Rule(f"{_BLOCK}.op.dt_projs_bias", f"{_OP}/op/dt_projs_bias"),  # (K, D)
    Rule(f"{_BLOCK}.op.A_logs", f"{_OP}/op/A_logs"),  # (K * D, N)
    Rule(f"{_BLOCK}.op.Ds", f"{_OP}/op/Ds"),  # (K * D,)
    *norm_rules(f"{_BLOCK}.op.out_norm", f"{_OP}/op/out_norm"),
    Rule(f"{_BLOCK}.op.out_proj.weight", f"{_OP}/op/out_proj/kernel", linear2d),
    *norm_rules(f"{_BLOCK}.norm2", f"{_OP}/norm2"),
    Rule(f"{_BLOCK}.mlp.fc1.weight", f"{_OP}/mlp/fc1/kernel", linear2d),
    Rule(f"{_BLOCK}.mlp.fc1.bias", f"{_OP}/mlp/fc1/bias"),
    Rule(f"{_BLOCK}.mlp.fc2.weight", f"{_OP}/mlp/fc2/kernel", linear2d),
    Rule(f"{_BLOCK}.mlp.fc2.bias", f"{_OP}/mlp/fc2/bias"),
    *conv_rules("layers.{i}.downsample.1", "layers_{i}/downsample_conv"),
    *norm_rules("layers.{i}.downsample.3", "layers_{i}/downsample_norm"),
    *norm_rules("classifier.norm", "classifier_norm"),
]

IGNORED = "classifier.head.weight/classifier.head.bias (the ImageNet classifier; medjax outputs its input)"

FORMATS = [
    Format("vmamba_official", "vmamba", RULES,
           r"layers\.\d+\.blocks\.\d+\.op\.(x_proj_weight|dt_projs_weight|A_logs|Ds)",
           ignore=[r"classifier\.head\.(weight|bias)"]),
]

# ------------------------------------------------------------------------------------------------ config

# VSSM constructor arguments and the only values medjax implements (None: any value of the right kind).
_VSSM_KW = {"patch_size", "in_chans", "num_classes", "depths", "dims", "ssm_d_state", "ssm_ratio", "ssm_dt_rank",
            "ssm_act_layer", "ssm_conv", "ssm_conv_bias", "ssm_drop_rate", "ssm_init", "forward_type", "mlp_ratio",
            "mlp_act_layer", "mlp_drop_rate", "gmlp", "drop_path_rate", "patch_norm", "norm_layer",
            "downsample_version", "patchembed_version", "use_checkpoint", "posembed", "imgsize",
            "ssm_rank_ratio"}  # ssm_rank_ratio: passed by build_vssm_model, swallowed by VSSM's **kwargs
_FIXED = {  # argument: (upstream default, values medjax supports)
    "forward_type": ("v2", ("v05_noz",)),
    "patchembed_version": ("v1", ("v2",)),
    "downsample_version": ("v2", ("v3",)),
    "ssm_act_layer": ("silu", ("silu",)),
    "mlp_act_layer": ("gelu", ("gelu",)),
    "gmlp": (False, (False,)),
    "patch_norm": (True, (True,)),
    "posembed": (False, (False,)),
    "ssm_init": ("v0", ("v0", "v1", "v2")),  # initialisation only
}


def vssm_config(kw: dict) -> VMambaConfig:
    """`VSSM(**kwargs)` keyword arguments (upstream defaults where absent) -> VMambaConfig; refuses, by name, any
    value that changes the network into something medjax does not implement."""
    check_keys(kw, _VSSM_KW, "vmamba config")
    bad = []
    for key, (default, ok) in _FIXED.items():
        value = kw.get(key, default)
        norm = value.lower() if isinstance(value, str) and key.endswith("_layer") else value
        if norm not in ok:
            bad.append(f"{key}={value!r} (supported: {', '.join(map(repr, ok))})")
    norm_layer = str(kw.get("norm_layer", "LN")).lower()
    if norm_layer not in ("ln", "ln2d"):  # both are LayerNorm eps 1e-5; "bn" is BatchNorm2d
        bad.append(f"norm_layer={kw['norm_layer']!r} (supported: 'ln2d', 'ln')")
    ratio, mlp_ratio = float(kw.get("ssm_ratio", 2.0)), float(kw.get("mlp_ratio", 4.0))
    if ratio <= 0:
        bad.append(f"ssm_ratio={kw['ssm_ratio']!r} (blocks without the SS2D branch are not supported)")
    if mlp_ratio <= 0:
        bad.append(f"mlp_ratio={kw['mlp_ratio']!r} (blocks without the MLP branch are not supported)")
    conv_size = int(kw.get("ssm_conv", 3))
    if conv_size > 1 and conv_size % 2 == 0:
        bad.append(f"ssm_conv={conv_size} (an even depthwise kernel changes the map size upstream)")
    dt_rank = kw.get("ssm_dt_rank", "auto")
    if dt_rank != "auto" and not (isinstance(dt_rank, int) and dt_rank > 0):
        bad.append(f"ssm_dt_rank={dt_rank!r} (supported: 'auto' or a positive int)")
    patch = int(kw.get("patch_size", 4))
    if patch < 2:
        bad.append(f"patch_size={patch} (patch embed v2 needs >= 2)")
    if bad:
        raise CheckpointError("vmamba config: unsupported VSSM arguments: " + "; ".join(bad) + ". medjax implements "
                              "the v2 VMamba models (forward_type v05_noz, patch embed v2, downsample v3, LayerNorm).")
    depths = list(kw.get("depths", [2, 2, 9, 2]))
    dims = kw.get("dims", [96, 192, 384, 768])
    if isinstance(dims, int):  # as upstream: an int is the first width, doubled per stage
        dims = [int(dims * 2 ** i) for i in range(len(depths))]
    if len(dims) != len(depths):
        raise CheckpointError(f"vmamba config: dims {dims} and depths {depths} differ in length")
    return VMambaConfig(dims=tuple(dims), depths=tuple(depths), patch_size=patch, in_chans=int(kw.get("in_chans", 3)),
                        d_state=int(kw.get("ssm_d_state", 16)), ssm_ratio=ratio, dt_rank=dt_rank,
                        ssm_conv=conv_size, ssm_conv_bias=bool(kw.get("ssm_conv_bias", True)), mlp_ratio=mlp_ratio,
                        img_size=int(kw.get("imgsize", 224)))


# ------------------------------------------------------------------------------------------------ variants

def _s2l15(dims: int, drop_path: float) -> dict:
    """The released `vmambav2_{small,base}_224` models (upstream `vmamba_{small,base}_s2l15`)."""
    return {"depths": [2, 2, 15, 2], "dims": dims, "drop_path_rate": drop_path, "patch_size": 4, "in_chans": 3,
            "num_classes": 1000, "ssm_d_state": 1, "ssm_ratio": 2.0, "ssm_dt_rank": "auto", "ssm_act_layer": "silu",
            "ssm_conv": 3, "ssm_conv_bias": False, "ssm_drop_rate": 0.0, "ssm_init": "v0", "forward_type": "v05_noz",
            "mlp_ratio": 4.0, "mlp_act_layer": "gelu", "mlp_drop_rate": 0.0, "gmlp": False, "patch_norm": True,
            "norm_layer": "ln2d", "downsample_version": "v3", "patchembed_version": "v2", "use_checkpoint": False,
            "posembed": False, "imgsize": 224}


VARIANTS = {
    "vmamba_small": ("vmamba", _s2l15(96, 0.3)),  # vssm_small_0229_ckpt_epoch_222.pth
    "vmamba_base": ("vmamba", _s2l15(128, 0.6)),  # vssm_base_0229_ckpt_epoch_237.pth
}

CONVERTERS = [Converter("vmamba", FORMATS, vssm_config, IGNORED)]
