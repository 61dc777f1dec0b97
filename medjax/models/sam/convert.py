"""Key tables and config readers for the SAM v1 image encoder (family `sam_vit`): the official `sam_vit_{b,l,h}_*.pth`
files (a plain state dict of the whole `Sam`; only `image_encoder.*` is used), a bare `ImageEncoderViT` state dict,
and transformers' `SamModel` / `SamVisionModel` safetensors (`vision_encoder.*`)."""

from __future__ import annotations

import re

from medjax.conversion import (
    CheckpointError,
    Converter,
    Format,
    Rule,
    check_keys,
    conv,
    dense_rules,
    norm_rules,
    renamed,
    transformers_vision_config,
)
from medjax.models.sam.model import FAMILY, SamViTConfig

# ------------------------------------------------------------------------------------------------ key tables

# segment_anything naming, inside `image_encoder.` (the pos-embed is stored NHWC already).
OFFICIAL_RULES = [
    Rule("pos_embed", "pos_embed"),
    Rule("patch_embed.proj.weight", "patch_embed/kernel", conv),
    Rule("patch_embed.proj.bias", "patch_embed/bias"),
    *norm_rules("blocks.{i}.norm1", "blocks_{i}/norm1"),
    *dense_rules("blocks.{i}.attn.qkv", "blocks_{i}/attn/qkv"),
    *dense_rules("blocks.{i}.attn.proj", "blocks_{i}/attn/proj"),
    Rule("blocks.{i}.attn.rel_pos_h", "blocks_{i}/attn/rel_pos_h"),
    Rule("blocks.{i}.attn.rel_pos_w", "blocks_{i}/attn/rel_pos_w"),
    *norm_rules("blocks.{i}.norm2", "blocks_{i}/norm2"),
    *dense_rules("blocks.{i}.mlp.lin1", "blocks_{i}/mlp/fc1"),
    *dense_rules("blocks.{i}.mlp.lin2", "blocks_{i}/mlp/fc2"),
    Rule("neck.0.weight", "neck/conv1/kernel", conv),
    *norm_rules("neck.1", "neck/norm1"),
    Rule("neck.2.weight", "neck/conv2/kernel", conv),
    *norm_rules("neck.3", "neck/norm2"),
]

# transformers' on-disk naming, inside `vision_encoder.` (SamModel and SamVisionModel alike): the same table, renamed.
HF_RULES = renamed(OFFICIAL_RULES, {"patch_embed.proj.": "patch_embed.projection.",
                                    "blocks.{i}.norm": "layers.{i}.layer_norm", "blocks.{i}.": "layers.{i}.",
                                    "neck.0.": "neck.conv1.", "neck.1.": "neck.layer_norm1.",
                                    "neck.2.": "neck.conv2.", "neck.3.": "neck.layer_norm2."})

FORMATS = [
    # sam_vit_{b,l,h}_*.pth: the whole Sam; prompt_encoder.* and mask_decoder.* are skipped.
    Format("sam_official", FAMILY, OFFICIAL_RULES, r"patch_embed\.proj\.weight", select_prefix="image_encoder."),
    Format("sam_image_encoder", FAMILY, OFFICIAL_RULES, r"patch_embed\.proj\.weight"),  # ImageEncoderViT alone
    # SamModel / SamVisionModel: prompt_encoder.*, mask_decoder.*, shared_image_embedding.* are skipped.
    Format("sam_transformers", FAMILY, HF_RULES, r"patch_embed\.projection\.weight", select_prefix="vision_encoder.",
           hf=True),
]

IGNORED_KEYS_DOC = ("everything outside image_encoder.* in official SAM files (prompt_encoder.*, mask_decoder.*) and "
                    "outside vision_encoder.* in transformers' SamModel (prompt_encoder.*, mask_decoder.*, "
                    "shared_image_embedding.*)")

# ------------------------------------------------------------------------------------------------ configs

_OFFICIAL_KW = {"img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "out_chans",
                "qkv_bias", "norm_layer", "act_layer", "use_abs_pos", "use_rel_pos", "rel_pos_zero_init",
                "window_size", "global_attn_indexes",
                "prompt_encoder", "mask_decoder"}  # the rest of a whole Sam, described beside the encoder: not used


def _config(**kw) -> SamViTConfig:
    try:
        return SamViTConfig(family=FAMILY, **kw)
    except ValueError as e:
        raise CheckpointError(f"sam_vit config: {e}") from e


def _eps(norm_layer) -> float:
    """The LayerNorm eps of an upstream `norm_layer` written as a string: `partial(torch.nn.LayerNorm, eps=1e-6)` as
    build_sam passes it, or `torch.nn.LayerNorm` (torch's default 1e-5, ImageEncoderViT's own default)."""
    text = str(norm_layer)
    if "LayerNorm" not in text:
        raise CheckpointError(f"sam_vit config: norm_layer {norm_layer!r} is not supported (torch.nn.LayerNorm)")
    m = re.search(r"eps\s*=\s*([0-9.eE+-]+)", text)
    return float(m.group(1)) if m else 1e-5


def official_config(kw: dict) -> SamViTConfig:
    """segment_anything `ImageEncoderViT` kwargs, defaults as upstream's constructor (note: its `norm_layer` default
    is nn.LayerNorm with eps 1e-5 and use_rel_pos False; build_sam passes eps 1e-6 and use_rel_pos True)."""
    if isinstance(kw.get("image_encoder"), dict):
        kw = kw["image_encoder"]
    check_keys(kw, _OFFICIAL_KW, "sam_vit config (ImageEncoderViT)")
    act = str(kw.get("act_layer", "torch.nn.GELU"))
    if not re.search(r"\bGELU\b", act) or "tanh" in act:  # torch.nn.GELU, nn.GELU, <class '...GELU'>
        raise CheckpointError(f"sam_vit config: act_layer {act!r} is not supported (torch.nn.GELU)")
    dim, patch, img = kw.get("embed_dim", 768), kw.get("patch_size", 16), kw.get("img_size", 1024)
    return _config(
        width=dim, depth=kw.get("depth", 12), num_heads=kw.get("num_heads", 12), patch_size=patch,
        pos_grid=(img // patch, img // patch), mlp_hidden=int(dim * kw.get("mlp_ratio", 4.0)),
        out_chans=kw.get("out_chans", 256), in_chans=kw.get("in_chans", 3), qkv_bias=kw.get("qkv_bias", True),
        use_abs_pos=kw.get("use_abs_pos", True), use_rel_pos=kw.get("use_rel_pos", False),
        window_size=kw.get("window_size", 0), global_attn_indexes=tuple(kw.get("global_attn_indexes", ())),
        norm_eps=_eps(kw.get("norm_layer", "torch.nn.LayerNorm")))


def transformers_config(cfg: dict) -> SamViTConfig:
    """A transformers config.json: SamVisionConfig (`sam_vision_model`) or SamConfig (`sam`, its `vision_config`).
    Missing keys take SamVisionConfig's defaults."""
    cfg = transformers_vision_config(cfg, FAMILY, "sam_vision_model", ("sam",))
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"transformers SamVisionConfig: hidden_act {cfg['hidden_act']!r} is not supported "
                              "(gelu, the exact erf form)")
    dim, patch, img = cfg.get("hidden_size", 768), cfg.get("patch_size", 16), cfg.get("image_size", 1024)
    mlp = cfg.get("mlp_dim") or int(dim * cfg.get("mlp_ratio", 4.0))
    return _config(
        width=dim, depth=cfg.get("num_hidden_layers", 12), num_heads=cfg.get("num_attention_heads", 12),
        patch_size=patch, pos_grid=(img // patch, img // patch), mlp_hidden=mlp,
        out_chans=cfg.get("output_channels", 256), in_chans=cfg.get("num_channels", 3),
        qkv_bias=cfg.get("qkv_bias", True), use_abs_pos=cfg.get("use_abs_pos", True),
        use_rel_pos=cfg.get("use_rel_pos", True), window_size=cfg.get("window_size", 14),
        global_attn_indexes=tuple(cfg.get("global_attn_indexes", (2, 5, 8, 11))),
        norm_eps=float(cfg.get("layer_norm_eps", 1e-6)))


def parse_config(cfg: dict) -> SamViTConfig:
    return transformers_config(cfg) if "model_type" in cfg else official_config(cfg)


# ------------------------------------------------------------------------------------------------ variants

def _build_sam(dim: int, depth: int, heads: int, global_attn: tuple[int, ...]) -> dict:
    """segment_anything.build_sam._build_sam's ImageEncoderViT arguments."""
    return {"img_size": 1024, "patch_size": 16, "embed_dim": dim, "depth": depth, "num_heads": heads, "mlp_ratio": 4,
            "out_chans": 256, "qkv_bias": True, "norm_layer": "partial(torch.nn.LayerNorm, eps=1e-6)",
            "use_rel_pos": True, "window_size": 14, "global_attn_indexes": list(global_attn)}


VARIANTS = {
    "sam_vit_b": (FAMILY, _build_sam(768, 12, 12, (2, 5, 8, 11))),  # sam_vit_b_01ec64.pth, facebook/sam-vit-base
    "sam_vit_l": (FAMILY, _build_sam(1024, 24, 16, (5, 11, 17, 23))),  # sam_vit_l_0b3195.pth, facebook/sam-vit-large
    "sam_vit_h": (FAMILY, _build_sam(1280, 32, 16, (7, 15, 23, 31))),  # sam_vit_h_4b8939.pth, facebook/sam-vit-huge
}

CONVERTERS = [Converter(FAMILY, FORMATS, parse_config, IGNORED_KEYS_DOC)]
