"""Key tables, config readers and variants of the DINOv3 ViTs: transformers' `DINOv3ViTModel` files (the gated Hugging
Face repos `facebook/dinov3-*-pretrain-lvd1689m`: config.json + model.safetensors) and the official
facebookresearch/dinov3 torch.hub files (`dinov3_vit*16*_pretrain_lvd1689m-<hash>.pth`, a plain state dict of
`DinoVisionTransformer`).

The official naming fuses q, k, v (`attn.qkv`, split here) and masks the key bias with a `bias_mask` buffer
(`mask_k_bias=True`: the key bias is dropped, as transformers' conversion drops it). Its RoPE periods are a buffer of
the file (`rope_embed.periods`, bfloat16 in the released files) and are kept as the model's `rope/periods` variable, so
a converted hub file computes exactly what the official code computes; a transformers file computes them from
`rope_theta`, as transformers does.
"""

from __future__ import annotations

import dataclasses

from medjax.conversion import (
    CheckpointError,
    Converter,
    Format,
    Rule,
    check_keys,
    conv,
    dense_rules,
    linear,
    norm_rules,
    transformers_vision_config,
)
from medjax.models.dinov3.model import ACTIVATIONS, FAMILY, DINOv3Config

# ------------------------------------------------------------------------------------------------ key tables

_HF_LAYER, _OUR = "layer.{i}", "blocks_{i}"
_HF_COMMON = [
    Rule("embeddings.cls_token", "cls_token"),
    Rule("embeddings.register_tokens", "reg_tokens"),
    Rule("embeddings.patch_embeddings.weight", "patch_embed/kernel", conv),
    Rule("embeddings.patch_embeddings.bias", "patch_embed/bias"),
    *norm_rules(f"{_HF_LAYER}.norm1", f"{_OUR}/norm1"),
    *[r for n in ("q", "k", "v", "o") for r in dense_rules(f"{_HF_LAYER}.attention.{n}_proj", f"{_OUR}/attn/{n}_proj")],
    Rule(f"{_HF_LAYER}.layer_scale1.lambda1", f"{_OUR}/ls1/gamma"),
    *norm_rules(f"{_HF_LAYER}.norm2", f"{_OUR}/norm2"),
    Rule(f"{_HF_LAYER}.layer_scale2.lambda1", f"{_OUR}/ls2/gamma"),
    *norm_rules("norm", "norm"),
]
# plain MLP: up_proj -> act -> down_proj; gated: down_proj(act(gate_proj x) * up_proj x)
HF_RULES = _HF_COMMON + dense_rules(f"{_HF_LAYER}.mlp.up_proj", f"{_OUR}/mlp/fc1") + \
    dense_rules(f"{_HF_LAYER}.mlp.down_proj", f"{_OUR}/mlp/fc2")
HF_GATED_RULES = _HF_COMMON + [r for src, dst in (("gate_proj", "w1"), ("up_proj", "w2"), ("down_proj", "w3"))
                                for r in dense_rules(f"{_HF_LAYER}.mlp.{src}", f"{_OUR}/mlp/{dst}")]

_BLOCK = "blocks.{i}"
_QKV = [Rule(f"{_BLOCK}.attn.qkv.weight", f"{_OUR}/attn/{n}_proj/kernel", linear, split=(j, 3))
        for j, n in enumerate("qkv")]
_QV_BIAS = [Rule(f"{_BLOCK}.attn.qkv.bias", f"{_OUR}/attn/{n}_proj/bias", split=(j, 3))
            for j, n in ((0, "q"), (2, "v"))]
_K_BIAS = [Rule(f"{_BLOCK}.attn.qkv.bias", f"{_OUR}/attn/k_proj/bias", split=(1, 3))]
_HUB_COMMON = [
    Rule("cls_token", "cls_token"),
    Rule("storage_tokens", "reg_tokens"),
    Rule("patch_embed.proj.weight", "patch_embed/kernel", conv),
    Rule("patch_embed.proj.bias", "patch_embed/bias"),
    Rule("rope_embed.periods", "rope:periods"),
    *norm_rules(f"{_BLOCK}.norm1", f"{_OUR}/norm1"),
    *_QKV,
    *dense_rules(f"{_BLOCK}.attn.proj", f"{_OUR}/attn/o_proj"),
    Rule(f"{_BLOCK}.ls1.gamma", f"{_OUR}/ls1/gamma"),
    *norm_rules(f"{_BLOCK}.norm2", f"{_OUR}/norm2"),
    *[r for n in ("fc1", "fc2", "w1", "w2", "w3") for r in dense_rules(f"{_BLOCK}.mlp.{n}", f"{_OUR}/mlp/{n}")],
    Rule(f"{_BLOCK}.ls2.gamma", f"{_OUR}/ls2/gamma"),
    *norm_rules("norm", "norm"),
]
# mask_k_bias=True (every released file): the key third of qkv.bias is multiplied by bias_mask = 0, i.e. dropped
HUB_MASKED_RULES = _HUB_COMMON + _QV_BIAS
HUB_RULES = _HUB_COMMON + _QV_BIAS + _K_BIAS

_HUB_IGNORE = [r"mask_token", r"local_cls_norm\.(weight|bias)", r"blocks\.\d+\.attn\.qkv\.bias_mask"]
_HF_FIXES = [(r"^model\.layer\.", "layer.")]  # transformers 5's module path of the blocks (model.layer.N)

FORMATS = [
    Format("dinov3_transformers_gated", FAMILY, HF_GATED_RULES, r"layer\.\d+\.mlp\.gate_proj\.weight",
           ignore=[r"embeddings\.mask_token"], key_fixes=_HF_FIXES, hf=True),
    Format("dinov3_transformers", FAMILY, HF_RULES, r"embeddings\.patch_embeddings\.weight",
           ignore=[r"embeddings\.mask_token"], key_fixes=_HF_FIXES, hf=True),
    Format("dinov3_hub", FAMILY, HUB_MASKED_RULES, r"blocks\.\d+\.attn\.qkv\.bias_mask", ignore=_HUB_IGNORE),
    Format("dinov3_hub", FAMILY, HUB_RULES, r"(storage_tokens|rope_embed\.periods|patch_embed\.proj\.weight)",
           ignore=_HUB_IGNORE),
]

IGNORED = ("the mask token (embeddings.mask_token / mask_token: masked-image pretraining only); hub files: "
           "blocks.N.attn.qkv.bias_mask (the key-bias mask: the masked key bias is dropped) and local_cls_norm.* "
           "(the local-crop CLS norm, training only)")

# ------------------------------------------------------------------------------------------------ configs

# DinoVisionTransformer's constructor arguments (and _make_dinov3_vit's hub-only ones, which build nothing)
_HUB_KW = {"img_size", "patch_size", "in_chans", "pos_embed_rope_base", "pos_embed_rope_min_period",
           "pos_embed_rope_max_period", "pos_embed_rope_normalize_coords", "pos_embed_rope_shift_coords",
           "pos_embed_rope_jitter_coords", "pos_embed_rope_rescale_coords", "pos_embed_rope_dtype", "embed_dim",
           "depth", "num_heads", "ffn_ratio", "qkv_bias", "layerscale_init", "norm_layer", "ffn_layer", "ffn_bias",
           "proj_bias", "n_storage_tokens", "mask_k_bias", "untie_cls_and_patch_norms",
           "untie_global_and_local_cls_norm", "device", "compact_arch_name", "pretrained", "weights", "hash",
           "version", "check_hash"}
_NORMS = {"layernorm": 1e-6, "layernormbf16": 1e-5}  # both nn.LayerNorm (the bf16 name is historical)
_SWIGLU_ALIGN = {"swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128}


def swiglu_hidden(hidden: int, align: int) -> int:
    """The official SwiGLUFFN's hidden width: two thirds of the MLP's, rounded up to a multiple of `align`."""
    d = int(hidden * 2 / 3)
    return d + (-d % align)


def _nominal(v) -> int:
    """A config's image size, which only states the nominal input (RoPE adapts to any grid): its height."""
    return int(v[0] if isinstance(v, (list, tuple)) else v)


def _size(v, what: str) -> int:
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or v[0] != v[1]:
            raise CheckpointError(f"dinov3 config: {what} {v} is not square; medjax supports square {what}s")
        v = v[0]
    return int(v)


def hub_config(kw: dict) -> DINOv3Config:
    """`DinoVisionTransformer(**kwargs)` (the hub functions' arguments; upstream defaults where absent)."""
    check_keys(kw, _HUB_KW, "dinov3 hub config")
    bad = []
    norm = kw.get("norm_layer", "layernorm")
    if norm not in _NORMS:
        bad.append(f"norm_layer={norm!r} (supported: {', '.join(_NORMS)})")
    ffn = kw.get("ffn_layer", "mlp")
    if ffn != "mlp" and ffn not in _SWIGLU_ALIGN:
        bad.append(f"ffn_layer={ffn!r} (supported: mlp, {', '.join(_SWIGLU_ALIGN)})")
    if kw.get("pos_embed_rope_dtype", "bf16") != "fp32":
        bad.append(f"pos_embed_rope_dtype={kw.get('pos_embed_rope_dtype', 'bf16')!r} (the constructor's default is "
                   "'bf16'; medjax computes RoPE in float32 as every released model does: give 'fp32')")
    if kw.get("untie_cls_and_patch_norms", False):
        bad.append("untie_cls_and_patch_norms=True (no released model; transformers has no cls_norm either)")
    normalize = kw.get("pos_embed_rope_normalize_coords", "separate")
    if normalize not in ("separate", "min", "max"):
        bad.append(f"pos_embed_rope_normalize_coords={normalize!r} (supported: separate, min, max)")
    if bad:
        raise CheckpointError("dinov3 hub config: unsupported DinoVisionTransformer arguments: " + "; ".join(bad))
    width, ratio = int(kw.get("embed_dim", 768)), float(kw.get("ffn_ratio", 4.0))
    hidden = int(width * ratio)
    if ffn != "mlp":
        hidden = swiglu_hidden(hidden, _SWIGLU_ALIGN[ffn])
    qkv_bias = bool(kw.get("qkv_bias", True))
    base = kw.get("pos_embed_rope_base", 100.0)
    min_p, max_p = kw.get("pos_embed_rope_min_period"), kw.get("pos_embed_rope_max_period")
    if min_p is not None and max_p is not None:
        base = kw.get("pos_embed_rope_base") if "pos_embed_rope_base" in kw else None
    opt = lambda k: None if kw.get(k) is None else float(kw[k])  # noqa: E731
    try:
        return DINOv3Config(
            width=width, depth=int(kw.get("depth", 12)), num_heads=int(kw.get("num_heads", 12)),
            patch_size=_size(kw.get("patch_size", 16), "patch_size"), mlp_hidden=hidden, gated_mlp=ffn != "mlp",
            act="gelu" if ffn == "mlp" else "silu", in_chans=int(kw.get("in_chans", 3)),
            img_size=_nominal(kw.get("img_size", 224)), num_registers=int(kw.get("n_storage_tokens", 0)),
            query_bias=qkv_bias, key_bias=qkv_bias and not kw.get("mask_k_bias", False), value_bias=qkv_bias,
            proj_bias=bool(kw.get("proj_bias", True)), mlp_bias=bool(kw.get("ffn_bias", True)),
            layerscale=bool(kw.get("layerscale_init")), norm_eps=_NORMS[norm],
            rope_theta=None if base is None else float(base), rope_min_period=opt("pos_embed_rope_min_period"),
            rope_max_period=opt("pos_embed_rope_max_period"), rope_normalize=normalize,
            rope_stored_periods=True, rope_shift=opt("pos_embed_rope_shift_coords"),
            rope_jitter=opt("pos_embed_rope_jitter_coords"), rope_rescale=opt("pos_embed_rope_rescale_coords"))
    except ValueError as e:
        raise CheckpointError(f"dinov3 hub config: {e}") from e


def transformers_config(cfg: dict) -> DINOv3Config:
    """transformers' DINOv3ViTConfig (`dinov3_vit`); missing keys take the config class's defaults."""
    cfg = transformers_vision_config(cfg, FAMILY, "dinov3_vit")
    act = cfg.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"dinov3 transformers config: hidden_act {act!r} is not supported "
                              f"({', '.join(sorted(ACTIVATIONS))})")
    opt = lambda k, d=None: None if cfg.get(k, d) is None else float(cfg.get(k, d))  # noqa: E731
    try:
        return DINOv3Config(
            width=int(cfg.get("hidden_size", 384)), depth=int(cfg.get("num_hidden_layers", 12)),
            num_heads=int(cfg.get("num_attention_heads", 6)), patch_size=_size(cfg.get("patch_size", 16), "patch_size"),
            mlp_hidden=int(cfg.get("intermediate_size", 1536)), gated_mlp=bool(cfg.get("use_gated_mlp", False)),
            act=act, in_chans=int(cfg.get("num_channels", 3)), img_size=_nominal(cfg.get("image_size", 224)),
            num_registers=int(cfg.get("num_register_tokens", 0)), query_bias=bool(cfg.get("query_bias", True)),
            key_bias=bool(cfg.get("key_bias", False)), value_bias=bool(cfg.get("value_bias", True)),
            proj_bias=bool(cfg.get("proj_bias", True)), mlp_bias=bool(cfg.get("mlp_bias", True)), layerscale=True,
            norm_eps=float(cfg.get("layer_norm_eps", 1e-5)), rope_theta=float(cfg.get("rope_theta", 100.0)),
            rope_stored_periods=False, rope_shift=opt("pos_embed_shift"), rope_jitter=opt("pos_embed_jitter"),
            rope_rescale=opt("pos_embed_rescale", 2.0))
    except ValueError as e:
        raise CheckpointError(f"dinov3 transformers config: {e}") from e


def parse_config(cfg: dict) -> DINOv3Config:
    return transformers_config(cfg) if "model_type" in cfg else hub_config(cfg)


def adjust(config: DINOv3Config, fmt: Format, kwargs: dict, options: dict) -> DINOv3Config:
    """The RoPE periods come from the file for a hub file (its `rope_embed.periods`), from rope_theta for a
    transformers file, whichever config described the architecture."""
    if fmt.hf and config.rope_theta is None:
        raise CheckpointError("dinov3: a transformers file computes its RoPE periods from rope_theta; this config "
                              "gives rope_min_period / rope_max_period instead")
    return dataclasses.replace(config, rope_stored_periods=not fmt.hf)


# ------------------------------------------------------------------------------------------------ variants

def _hub(dim, depth, heads, ffn_ratio, ffn="mlp", qkv_bias=True):
    """facebookresearch/dinov3 `dinov3/hub/backbones.py`: the arguments every released ViT passes."""
    return {"img_size": 224, "patch_size": 16, "in_chans": 3, "pos_embed_rope_base": 100,
            "pos_embed_rope_normalize_coords": "separate", "pos_embed_rope_rescale_coords": 2,
            "pos_embed_rope_dtype": "fp32", "embed_dim": dim, "depth": depth, "num_heads": heads,
            "ffn_ratio": ffn_ratio, "qkv_bias": qkv_bias, "drop_path_rate": 0.0, "layerscale_init": 1.0e-05,
            "norm_layer": "layernormbf16", "ffn_layer": ffn, "ffn_bias": True, "proj_bias": True,
            "n_storage_tokens": 4, "mask_k_bias": True}


VARIANTS = {
    "dinov3_vits16": (FAMILY, _hub(384, 12, 6, 4)),
    "dinov3_vits16plus": (FAMILY, _hub(384, 12, 6, 6, "swiglu")),
    "dinov3_vitb16": (FAMILY, _hub(768, 12, 12, 4)),
    "dinov3_vitl16": (FAMILY, _hub(1024, 24, 16, 4)),
    "dinov3_vitl16plus": (FAMILY, _hub(1024, 24, 16, 6.0, "swiglu")),
    "dinov3_vith16plus": (FAMILY, _hub(1280, 32, 20, 6.0, "swiglu")),
    "dinov3_vit7b16": (FAMILY, _hub(4096, 40, 32, 3, "swiglu64", qkv_bias=False)),
}

CONVERTERS = [Converter(FAMILY, FORMATS, parse_config, IGNORED, adjust)]
