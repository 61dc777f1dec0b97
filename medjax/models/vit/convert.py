"""Key tables and config readers for the ViT family: DINOv2 (and its hub linear-classifier heads), MAE, DeiT (timm
naming), transformers' Dinov2 / Dinov2WithRegisters / ViTMAE / ViT / ViTMSN / CLIP vision / Aimv2Vision, apple/ml-aim's
AIMv2, the open_clip CLIP and CoCa towers and BiomedCLIP (open_clip with a timm ViT trunk)."""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

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
    pair,
    read_state_dict,
    reshape,
    sha256,
    transformers_vision_config,
)
from medjax.models.layers import swiglu_hidden
from medjax.models.vit.model import ViTConfig

# ------------------------------------------------------------------------------------------------ key tables


# timm / DINOv2 naming: DINOv2 torch.hub files, MAE and DeiT `{'model': ...}` files.
TIMM_RULES = [
    Rule("cls_token", "cls_token"),
    Rule("pos_embed", "pos_embed"),
    Rule("register_tokens", "reg_tokens"),
    Rule("patch_embed.proj.weight", "patch_embed/kernel", conv),
    Rule("patch_embed.proj.bias", "patch_embed/bias"),
    *norm_rules("blocks.{i}.norm1", "blocks_{i}/norm1"),
    *dense_rules("blocks.{i}.attn.qkv", "blocks_{i}/attn/qkv"),
    *dense_rules("blocks.{i}.attn.proj", "blocks_{i}/attn/proj"),
    Rule("blocks.{i}.ls1.gamma", "blocks_{i}/ls1/gamma"),
    *norm_rules("blocks.{i}.norm2", "blocks_{i}/norm2"),
    *dense_rules("blocks.{i}.mlp.fc1", "blocks_{i}/mlp/fc1"),
    *dense_rules("blocks.{i}.mlp.fc2", "blocks_{i}/mlp/fc2"),
    *dense_rules("blocks.{i}.mlp.w12", "blocks_{i}/mlp/w12"),
    *dense_rules("blocks.{i}.mlp.w3", "blocks_{i}/mlp/w3"),
    Rule("blocks.{i}.ls2.gamma", "blocks_{i}/ls2/gamma"),
    *norm_rules("norm", "norm"),
]

# transformers' on-disk naming (Dinov2Model, Dinov2WithRegistersModel, ViTMAEModel, ViTModel).
HF_RULES = [
    Rule("embeddings.cls_token", "cls_token"),
    Rule("embeddings.position_embeddings", "pos_embed"),
    Rule("embeddings.register_tokens", "reg_tokens"),
    Rule("embeddings.patch_embeddings.projection.weight", "patch_embed/kernel", conv),
    Rule("embeddings.patch_embeddings.projection.bias", "patch_embed/bias"),
    *norm_rules("encoder.layer.{i}.norm1", "blocks_{i}/norm1"),
    *norm_rules("encoder.layer.{i}.layernorm_before", "blocks_{i}/norm1"),
    *dense_rules("encoder.layer.{i}.attention.attention.query", "blocks_{i}/attn/qkv", (0, 3)),
    *dense_rules("encoder.layer.{i}.attention.attention.key", "blocks_{i}/attn/qkv", (1, 3)),
    *dense_rules("encoder.layer.{i}.attention.attention.value", "blocks_{i}/attn/qkv", (2, 3)),
    *dense_rules("encoder.layer.{i}.attention.output.dense", "blocks_{i}/attn/proj"),
    Rule("encoder.layer.{i}.layer_scale1.lambda1", "blocks_{i}/ls1/gamma"),
    *norm_rules("encoder.layer.{i}.norm2", "blocks_{i}/norm2"),
    *norm_rules("encoder.layer.{i}.layernorm_after", "blocks_{i}/norm2"),
    *dense_rules("encoder.layer.{i}.mlp.fc1", "blocks_{i}/mlp/fc1"),
    *dense_rules("encoder.layer.{i}.mlp.fc2", "blocks_{i}/mlp/fc2"),
    *dense_rules("encoder.layer.{i}.intermediate.dense", "blocks_{i}/mlp/fc1"),
    *dense_rules("encoder.layer.{i}.output.dense", "blocks_{i}/mlp/fc2"),
    *dense_rules("encoder.layer.{i}.mlp.weights_in", "blocks_{i}/mlp/w12"),
    *dense_rules("encoder.layer.{i}.mlp.weights_out", "blocks_{i}/mlp/w3"),
    Rule("encoder.layer.{i}.layer_scale2.lambda1", "blocks_{i}/ls2/gamma"),
    *norm_rules("layernorm", "norm"),
]

# open_clip `visual.*` (the prefix is stripped before matching).
OPEN_CLIP_RULES = [
    Rule("conv1.weight", "patch_embed/kernel", conv),
    Rule("class_embedding", "cls_token", reshape),
    Rule("positional_embedding", "pos_embed", reshape),
    *norm_rules("ln_pre", "ln_pre"),
    *norm_rules("transformer.resblocks.{i}.ln_1", "blocks_{i}/norm1"),
    Rule("transformer.resblocks.{i}.attn.in_proj_weight", "blocks_{i}/attn/qkv/kernel", linear),
    Rule("transformer.resblocks.{i}.attn.in_proj_bias", "blocks_{i}/attn/qkv/bias"),
    *dense_rules("transformer.resblocks.{i}.attn.out_proj", "blocks_{i}/attn/proj"),
    Rule("transformer.resblocks.{i}.ls_1.gamma", "blocks_{i}/ls1/gamma"),
    *norm_rules("transformer.resblocks.{i}.ln_2", "blocks_{i}/norm2"),
    *dense_rules("transformer.resblocks.{i}.mlp.c_fc", "blocks_{i}/mlp/fc1"),
    *dense_rules("transformer.resblocks.{i}.mlp.c_proj", "blocks_{i}/mlp/fc2"),
    Rule("transformer.resblocks.{i}.ls_2.gamma", "blocks_{i}/ls2/gamma"),
    *norm_rules("ln_post", "norm"),
    Rule("proj", "proj"),  # used as x @ proj: already (in, out)
]

# open_clip CoCa: the CLIP tower plus the attentional pooler. Older checkpoints hold separate q/k/v_proj_weight
# (nn.MultiheadAttention with kdim != embed_dim); a pooler whose widths agree stores a fused in_proj_weight.
COCA_RULES = OPEN_CLIP_RULES + [
    Rule("attn_pool.query", "attn_pool/query"),
    *norm_rules("attn_pool.ln_q", "attn_pool/ln_q"),
    *norm_rules("attn_pool.ln_k", "attn_pool/ln_k"),
    *[Rule(f"attn_pool.attn.{n}_proj_weight", f"attn_pool/{n}_proj/kernel", linear) for n in "qkv"],
    *[Rule("attn_pool.attn.in_proj_weight", f"attn_pool/{n}_proj/kernel", linear, split=(i, 3))
      for i, n in enumerate("qkv")],
    *[Rule("attn_pool.attn.in_proj_bias", f"attn_pool/{n}_proj/bias", split=(i, 3)) for i, n in enumerate("qkv")],
    *dense_rules("attn_pool.attn.out_proj", "attn_pool/out_proj"),
]


# apple/ml-aim AIMv2 (also the original hub revisions). SwiGLU fc1 (gate) and fc3 (value) become the fused w12.
AIM_RULES = [
    Rule("preprocessor.patchifier.proj.weight", "patch_embed/kernel", conv),
    Rule("preprocessor.patchifier.proj.bias", "patch_embed/bias"),
    *norm_rules("preprocessor.patchifier.norm", "patch_norm", bias=False),
    Rule("preprocessor.pos_embed", "pos_embed"),
    *norm_rules("trunk.blocks.{i}.norm_1", "blocks_{i}/norm1", bias=False),
    *dense_rules("trunk.blocks.{i}.attn.qkv", "blocks_{i}/attn/qkv"),
    *dense_rules("trunk.blocks.{i}.attn.proj", "blocks_{i}/attn/proj"),
    *norm_rules("trunk.blocks.{i}.norm_2", "blocks_{i}/norm2", bias=False),
    *dense_rules("trunk.blocks.{i}.mlp.fc1", "blocks_{i}/mlp/w12", (0, 2)),
    *dense_rules("trunk.blocks.{i}.mlp.fc3", "blocks_{i}/mlp/w12", (1, 2)),
    *dense_rules("trunk.blocks.{i}.mlp.fc2", "blocks_{i}/mlp/w3"),
    *norm_rules("trunk.post_trunk_norm", "norm", bias=False),
]

# transformers' Aimv2VisionModel on disk.
HF_AIM_RULES = [
    Rule("embeddings.patch_embed.weight", "patch_embed/kernel", conv),
    Rule("embeddings.patch_embed.bias", "patch_embed/bias"),
    *norm_rules("embeddings.rms_norm", "patch_norm", bias=False),
    Rule("embeddings.position_embedding.weight", "pos_embed", reshape),
    *norm_rules("encoder.layers.{i}.rms_norm1", "blocks_{i}/norm1", bias=False),
    *dense_rules("encoder.layers.{i}.attention.q_proj", "blocks_{i}/attn/qkv", (0, 3)),
    *dense_rules("encoder.layers.{i}.attention.k_proj", "blocks_{i}/attn/qkv", (1, 3)),
    *dense_rules("encoder.layers.{i}.attention.v_proj", "blocks_{i}/attn/qkv", (2, 3)),
    *dense_rules("encoder.layers.{i}.attention.out_proj", "blocks_{i}/attn/proj"),
    *norm_rules("encoder.layers.{i}.rms_norm2", "blocks_{i}/norm2", bias=False),
    *dense_rules("encoder.layers.{i}.ffn.gate_proj", "blocks_{i}/mlp/w12", (0, 2)),
    *dense_rules("encoder.layers.{i}.ffn.up_proj", "blocks_{i}/mlp/w12", (1, 2)),
    *dense_rules("encoder.layers.{i}.ffn.down_proj", "blocks_{i}/mlp/w3"),
    *norm_rules("rms_norm", "norm", bias=False),
]

# transformers ViTModel / ViTMSNModel / ViTForImageClassification on disk (`vit.` stripped): HF_RULES plus the pooler.
HF_VIT_RULES = HF_RULES + dense_rules("pooler.dense", "pooler")

# transformers CLIPVisionModel[WithProjection] and the vision half of CLIPModel (`vision_model.` stripped).
HF_CLIP_RULES = [
    Rule("embeddings.class_embedding", "cls_token", reshape),
    Rule("embeddings.patch_embedding.weight", "patch_embed/kernel", conv),
    Rule("embeddings.position_embedding.weight", "pos_embed", reshape),
    *norm_rules("pre_layrnorm", "ln_pre"),  # sic
    *norm_rules("encoder.layers.{i}.layer_norm1", "blocks_{i}/norm1"),
    *dense_rules("encoder.layers.{i}.self_attn.q_proj", "blocks_{i}/attn/qkv", (0, 3)),
    *dense_rules("encoder.layers.{i}.self_attn.k_proj", "blocks_{i}/attn/qkv", (1, 3)),
    *dense_rules("encoder.layers.{i}.self_attn.v_proj", "blocks_{i}/attn/qkv", (2, 3)),
    *dense_rules("encoder.layers.{i}.self_attn.out_proj", "blocks_{i}/attn/proj"),
    *norm_rules("encoder.layers.{i}.layer_norm2", "blocks_{i}/norm2"),
    *dense_rules("encoder.layers.{i}.mlp.fc1", "blocks_{i}/mlp/fc1"),
    *dense_rules("encoder.layers.{i}.mlp.fc2", "blocks_{i}/mlp/fc2"),
    *norm_rules("post_layernorm", "norm"),
    Rule("visual_projection.weight", "proj", linear),  # nn.Linear without bias
]

# BiomedCLIP: open_clip's TimmModel under `visual.` = a timm VisionTransformer `trunk` + `head.proj` (no bias).
BIOMEDCLIP_RULES = [dataclasses.replace(r, source=f"trunk.{r.source}") for r in TIMM_RULES] + [
    Rule("head.proj.weight", "proj", linear), Rule("head.proj.bias", "proj_bias")]

# DINOv2's hub linear classifier (`dinov2_*_linear[4]_head.pth`, an nn.Linear state dict), under `lc_head.`.
LINEAR_HEAD_RULES = dense_rules("lc_head", "lc_head")

# ------------------------------------------------------------------------------------------------ formats


def pos_embed_load_resize(antialias: bool):
    """Resize a checkpoint's (1, 1 + M*M, D) pos-embed to the model's grid at conversion time (MAE/DeiT/open_clip
    do this when a model is built for another image size), size-based bicubic, CLS row kept."""

    def hook(value: np.ndarray, expected_shape: tuple) -> np.ndarray:
        from medjax.resize import resize_bicubic

        dim = value.shape[-1]
        value = value.reshape(1, -1, dim)
        if value.shape == tuple(expected_shape) or value.shape[-1] != expected_shape[-1]:
            return value
        n_old, n_new = value.shape[1] - 1, expected_shape[1] - 1
        m, g = int(round(n_old ** 0.5)), int(round(n_new ** 0.5))
        if m * m != n_old or g * g != n_new:
            return value  # not square: leave it to the shape check to report
        grid = value[:, 1:].reshape(1, m, m, dim)
        grid = np.asarray(resize_bicubic(grid, size=(g, g), antialias=antialias, axes=(1, 2)))
        return np.concatenate([value[:, :1], grid.reshape(1, g * g, dim)], axis=1)

    return hook


BICUBIC_RESIZE = pos_embed_load_resize(antialias=False)  # MAE interpolate_pos_embed, DeiT
ANTIALIASED_BICUBIC_RESIZE = pos_embed_load_resize(antialias=True)  # open_clip resize_pos_embed, timm resample

# ViT*ForImageClassification's classifier, ViTMSN's optional mask token, ViTMAEForPreTraining's decoder.
_HF_VIT_IGNORE = [r"classifier\..*", r"embeddings\.mask_token", r"decoder\..*"]
# A whole CLIPModel file: the text tower, its projection and logit_scale; older files also hold int64 position_ids.
_HF_CLIP_IGNORE = [r"text_model\..*", r"text_projection\.weight", r"logit_scale", r"embeddings\.position_ids"]

FORMATS = [
    Format("dinov2_hub", "dinov2", TIMM_RULES, r"pos_embed",
           ignore=[r"mask_token"], key_fixes=[(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.")]),  # block_chunks > 0
    Format("dinov2_transformers", "dinov2", HF_RULES, r"embeddings\.patch_embeddings\.projection\.weight",
           ignore=[r"embeddings\.mask_token"], strip_prefixes=("dinov2.", "dinov2_with_registers."), hf=True),
    Format("mae_official", "mae", TIMM_RULES, r"pos_embed", ignore=[r"mask_token", r"decoder.*"],
           hooks={"pos_embed": BICUBIC_RESIZE}),
    Format("mae_transformers", "mae", HF_RULES, r"embeddings\.patch_embeddings\.projection\.weight",
           ignore=[r"decoder\..*"], strip_prefixes=("vit.",), hf=True, hooks={"pos_embed": BICUBIC_RESIZE}),
    Format("deit_official", "deit", TIMM_RULES, r"pos_embed", ignore=[r"head\.(weight|bias)"],
           hooks={"pos_embed": BICUBIC_RESIZE}),
    Format("deit_transformers", "deit", HF_RULES, r"embeddings\.patch_embeddings\.projection\.weight",
           ignore=[r"pooler\..*", r"classifier\..*"], strip_prefixes=("vit.",), hf=True,
           hooks={"pos_embed": BICUBIC_RESIZE}),
    Format("open_clip", "clip", OPEN_CLIP_RULES, r"conv1\.weight", select_prefix="visual.",
           hooks={"pos_embed": ANTIALIASED_BICUBIC_RESIZE}),
    Format("open_clip_coca", "coca", COCA_RULES, r"conv1\.weight", select_prefix="visual.",
           hooks={"pos_embed": ANTIALIASED_BICUBIC_RESIZE}),
    Format("aimv2_ml_aim", "aimv2", AIM_RULES, r"preprocessor\.patchifier\.proj\.weight"),
    Format("aimv2_transformers", "aimv2", HF_AIM_RULES, r"embeddings\.patch_embed\.weight",
           ignore=[r"head\..*"], strip_prefixes=("vision_model.",), hf=True),
    # The pooler's presence is read off the file (ViTModel has it; ViTMSNModel and ViTForImageClassification do not).
    Format("vit_transformers_pooler", "hf_vit", HF_VIT_RULES, r"pooler\.dense\.weight",
           ignore=_HF_VIT_IGNORE, strip_prefixes=("vit.",), hf=True,
           hooks={"pos_embed": BICUBIC_RESIZE}),
    Format("vit_transformers", "hf_vit", HF_VIT_RULES, r"embeddings\.patch_embeddings\.projection\.weight",
           ignore=_HF_VIT_IGNORE, strip_prefixes=("vit.",), hf=True,
           hooks={"pos_embed": BICUBIC_RESIZE}),
    # Likewise the projection (CLIPVisionModelWithProjection, CLIPModel; CLIPVisionModel has none).
    Format("clip_transformers_projection", "hf_clip", HF_CLIP_RULES, r"visual_projection\.weight",
           ignore=_HF_CLIP_IGNORE, strip_prefixes=("vision_model.",), hf=True, hooks={"pos_embed": BICUBIC_RESIZE}),
    Format("clip_transformers", "hf_clip", HF_CLIP_RULES, r"embeddings\.patch_embedding\.weight",
           ignore=_HF_CLIP_IGNORE, strip_prefixes=("vision_model.",), hf=True, hooks={"pos_embed": BICUBIC_RESIZE}),
    Format("biomedclip_open_clip", "biomedclip", BIOMEDCLIP_RULES, r"trunk\.patch_embed\.proj\.weight",
           select_prefix="visual.", hooks={"pos_embed": ANTIALIASED_BICUBIC_RESIZE}),
]

IGNORED_KEYS_DOC = {
    "dinov2": "mask_token (training only)",
    "mae": "mask_token and decoder* (the MAE decoder), decoder.* in transformers' ViTMAEForPreTraining",
    "deit": "head.weight/head.bias (the ImageNet classifier); transformers' pooler.* and classifier.*",
    "clip": "everything outside visual.* (text tower, logit_scale)",
    "coca": "everything outside visual.* (text tower, text_decoder, logit_scale)",
    "aimv2": "transformers' head.* (use_head)",
    "hf_vit": "classifier.* (ViTForImageClassification / ViTMSNForImageClassification), embeddings.mask_token, "
              "decoder.* (ViTMAEForPreTraining)",
    "hf_clip": "text_model.*, text_projection.weight, logit_scale (a whole CLIPModel), position_ids buffers",
    "biomedclip": "everything outside visual.* (the BERT text tower text.*, logit_scale, position_ids)",
}

# ------------------------------------------------------------------------------------------------ configs

def _eps_from_norm_layer(kwargs: dict, default: float) -> float:
    m = re.search(r"eps\s*=\s*([0-9.eE+-]+)", str(kwargs.get("norm_layer", "")))
    return float(m.group(1)) if m else default


def _grid(img_size, patch) -> tuple[int, int]:
    h, w = pair(img_size)
    return h // patch, w // patch


_DINOV2_KW = {"img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
              "ffn_bias", "proj_bias", "init_values", "ffn_layer", "num_register_tokens", "interpolate_antialias",
              "interpolate_offset",
              "head"}  # a description of the hub linear head beside the backbone; the head itself is --linear-head


def dinov2_config(kw: dict) -> ViTConfig:
    """facebookresearch/dinov2 `DinoVisionTransformer` kwargs (defaults as upstream)."""
    check_keys(kw, _DINOV2_KW, "dinov2 config")
    dim, ratio, ffn = kw.get("embed_dim", 768), kw.get("mlp_ratio", 4.0), kw.get("ffn_layer", "mlp")
    if ffn not in ("mlp", "swiglu", "swiglufused"):
        raise CheckpointError(f"dinov2 config: ffn_layer {ffn!r} is not supported (mlp, swiglu, swiglufused)")
    hidden = int(dim * ratio)
    offset = kw.get("interpolate_offset", 0.1)
    return ViTConfig(
        family="dinov2", width=dim, depth=kw.get("depth", 12), num_heads=kw.get("num_heads", 12),
        patch_size=kw.get("patch_size", 16), pos_grid=_grid(kw.get("img_size", 224), kw.get("patch_size", 16)),
        mlp_hidden=hidden if ffn == "mlp" else swiglu_hidden(hidden), ffn="mlp" if ffn == "mlp" else "swiglu",
        in_chans=kw.get("in_chans", 3), qkv_bias=kw.get("qkv_bias", True), proj_bias=kw.get("proj_bias", True),
        ffn_bias=kw.get("ffn_bias", True), layerscale=bool(kw.get("init_values")), norm_eps=1e-6,
        num_registers=kw.get("num_register_tokens", 0), pos_resize="offset" if offset else "size",
        pos_resize_offset=float(offset or 0.0), pos_resize_antialias=bool(kw.get("interpolate_antialias", False)))


_TIMM_KW = {"img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
            "init_values", "class_token", "no_embed_class", "qk_norm", "pre_norm", "fc_norm", "reg_tokens"}


def timm_config(kw: dict, family: str) -> ViTConfig:
    """timm `VisionTransformer` kwargs as MAE's and DeiT's factories pass them."""
    check_keys(kw, _TIMM_KW, f"{family} config")
    for key, ok in (("class_token", True), ("no_embed_class", False), ("qk_norm", False), ("pre_norm", False),
                    ("reg_tokens", 0)):
        if kw.get(key, ok) != ok:
            raise CheckpointError(f"{family} config: {key}={kw[key]!r} is not supported (only {ok!r})")
    if kw.get("fc_norm") or kw.get("global_pool") in ("avg", True):
        raise CheckpointError(f"{family} config: global-pool / fc_norm models are not supported; medjax takes the "
                              "encoder (global_pool '' or 'token') and pools itself")
    dim, patch = kw.get("embed_dim", 768), kw.get("patch_size", 16)
    return ViTConfig(
        family=family, width=dim, depth=kw.get("depth", 12), num_heads=kw.get("num_heads", 12), patch_size=patch,
        pos_grid=_grid(kw.get("img_size", 224), patch), mlp_hidden=int(dim * kw.get("mlp_ratio", 4.0)),
        in_chans=kw.get("in_chans", 3), qkv_bias=kw.get("qkv_bias", True), layerscale=bool(kw.get("init_values")),
        norm_eps=_eps_from_norm_layer(kw, 1e-6))


_OPEN_CLIP_VISION_KW = {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size", "ls_init_value",
                        "output_tokens", "pool_type", "attentional_pool", "no_ln_pre", "final_ln_after_pool",
                        "pos_embed_type", "patch_dropout", "act_kwargs", "norm_kwargs", "output_dim",
                        "attn_pooler_queries", "attn_pooler_heads"}


def open_clip_config(cfg: dict, family: str = "clip") -> ViTConfig:
    """An open_clip model config (`model_configs/*.json`: embed_dim, vision_cfg, text_cfg); CoCa's adds the
    attentional pooler (`attentional_pool`, `attn_pooler_queries`, `attn_pooler_heads`)."""
    check_keys(cfg, {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text", "init_logit_bias",
                     "cast_dtype", "multimodal_cfg"}, f"{family} open_clip config")
    if "vision_cfg" not in cfg or "embed_dim" not in cfg:
        raise CheckpointError("open_clip config: needs `embed_dim` and `vision_cfg` (an open_clip model config)")
    v = cfg["vision_cfg"]
    check_keys(v, _OPEN_CLIP_VISION_KW, "open_clip vision_cfg")
    coca = family == "coca"
    if coca and v.get("attentional_pool") is not True:
        raise CheckpointError("coca config: vision_cfg.attentional_pool must be true (CoCa's pooler); a tower "
                              "without it is --model clip")
    unsupported = {"attentional_pool": v.get("attentional_pool", False) is not coca,
                   "no_ln_pre": v.get("no_ln_pre", False), "final_ln_after_pool": v.get("final_ln_after_pool", False),
                   "pool_type not 'tok'": v.get("pool_type", "tok") != "tok",
                   "pos_embed_type not 'learnable'": v.get("pos_embed_type", "learnable") != "learnable",
                   "timm_model_name": bool(v.get("timm_model_name")),
                   "layers as a list": isinstance(v.get("layers"), list)}
    bad = [k for k, on in unsupported.items() if on]
    if bad:
        raise CheckpointError(f"open_clip config: unsupported options {bad} (medjax's CLIP tower is the standard "
                              "ViT with GELU or QuickGELU, ln_pre and token pooling; CoCa has its own family)")
    width, patch = v.get("width", 768), v.get("patch_size", 16)
    return ViTConfig(
        width=width, depth=v.get("layers", 12), num_heads=width // v.get("head_width", 64),
        patch_size=patch, pos_grid=_grid(v.get("image_size", 224), patch),
        mlp_hidden=int(width * v.get("mlp_ratio", 4.0)), patch_bias=False,
        layerscale=v.get("ls_init_value") is not None,
        norm_eps=1e-5, ln_pre=True, proj_dim=cfg["embed_dim"], family=family,
        act="quick_gelu" if cfg.get("quick_gelu", False) else "gelu",
        attn_pool_queries=v.get("attn_pooler_queries", 256) if coca else 0,
        attn_pool_heads=v.get("attn_pooler_heads", 8))


_AIM_KW = {"img_size", "patch_size", "embed_dim", "mlp_hidden_dim", "num_blocks", "num_heads", "num_channels",
           "pos_embed_type", "head_type", "head_num_heads", "head_num_queries", "head_average_pool",
           "head_linear_bias", "use_bias"}


def aimv2_config(kw: dict) -> ViTConfig:
    """apple/ml-aim `AIMv2VisionEncoder` kwargs. Like ml-aim, a smaller input takes the first rows of the pos-embed."""
    check_keys(kw, _AIM_KW, "aimv2 config")
    if kw.get("pos_embed_type", "absolute") != "absolute" or kw.get("head_type") is not None:
        raise CheckpointError("aimv2 config: only pos_embed_type 'absolute' and head_type None (the released "
                              "aimv2_large/huge encoders) are supported")
    dim, patch, bias = kw.get("embed_dim", 1024), kw.get("patch_size", 14), bool(kw.get("use_bias", False))
    return _aimv2(dim, kw.get("num_blocks", 24), kw.get("num_heads", 8), patch, _grid(kw.get("img_size", 224), patch),
                  kw.get("mlp_hidden_dim", 2816), kw.get("num_channels", 3), bias, bias, 1e-5, "truncate")


def _aimv2(dim, depth, heads, patch, grid, hidden, chans, qkv_bias, bias, eps, pos_resize) -> ViTConfig:
    return ViTConfig(family="aimv2", width=dim, depth=depth, num_heads=heads, patch_size=patch, pos_grid=grid,
                     mlp_hidden=hidden, ffn="swiglu", in_chans=chans, qkv_bias=qkv_bias, proj_bias=bias,
                     ffn_bias=bias, norm="rms", norm_eps=eps, class_token=False, patch_norm=True,
                     pos_resize=pos_resize)


def transformers_config(cfg: dict, family: str) -> ViTConfig:
    """A transformers config.json (Dinov2Config, Dinov2WithRegistersConfig, ViTMAEConfig, ViTConfig)."""
    expected_types = {"dinov2": ("dinov2", "dinov2_with_registers"), "mae": ("vit_mae",), "deit": ("vit", "deit"),
                      "aimv2": ("aimv2_vision_model",)}
    model_type = cfg.get("model_type")
    if model_type not in expected_types.get(family, ()):
        raise CheckpointError(f"transformers config has model_type {model_type!r}; a {family} checkpoint needs one of "
                              f"{expected_types.get(family)}")
    dim, patch = cfg.get("hidden_size", 768), cfg.get("patch_size", 16)
    if family == "aimv2":
        if cfg.get("is_native") or cfg.get("hidden_act", "silu") != "silu":
            raise CheckpointError("transformers Aimv2 config: is_native (sin-cos pos-embed) models and activations "
                                  "other than silu are not supported")
        return _aimv2(dim, cfg.get("num_hidden_layers", 24), cfg.get("num_attention_heads", 8), patch,
                      _grid(cfg.get("image_size", 224), patch), cfg.get("intermediate_size", 2816),
                      cfg.get("num_channels", 3), cfg.get("qkv_bias", False), cfg.get("mlp_bias", False),
                      cfg.get("rms_norm_eps", 1e-5), "none")
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"transformers config: hidden_act {cfg['hidden_act']!r} is not supported (gelu)")
    common = dict(width=dim, depth=cfg.get("num_hidden_layers", 12), num_heads=cfg.get("num_attention_heads", 12),
                  patch_size=patch, pos_grid=_grid(cfg.get("image_size", 224), patch),
                  in_chans=cfg.get("num_channels", 3), qkv_bias=cfg.get("qkv_bias", True),
                  norm_eps=cfg.get("layer_norm_eps", 1e-6 if family == "dinov2" else 1e-12))
    if family != "dinov2":
        return ViTConfig(family=family, mlp_hidden=cfg.get("intermediate_size", 3072), **common)
    hidden = int(dim * cfg.get("mlp_ratio", 4))
    swiglu = cfg.get("use_swiglu_ffn", False)
    registers = cfg.get("num_register_tokens", 0) if model_type == "dinov2_with_registers" else 0
    # transformers resizes size-based with no offset; its register model adds antialias (like the official one).
    return ViTConfig(family="dinov2", mlp_hidden=swiglu_hidden(hidden) if swiglu else hidden,
                     ffn="swiglu" if swiglu else "mlp", layerscale=True, num_registers=registers,
                     pos_resize="size", pos_resize_antialias=bool(registers), **common)


_HF_VIT_EPS = {"vit": 1e-12, "vit_msn": 1e-6, "vit_mae": 1e-12}  # the config classes' layer_norm_eps defaults


def hf_vit_config(cfg: dict) -> ViTConfig:
    """transformers ViTConfig (`vit`: google/vit-*), ViTMSNConfig (`vit_msn`: facebook/vit-msn-*) or ViTMAEConfig
    (`vit_mae`, an MAE encoder read as a ViT, as the radiology study loads facebook/vit-mae-large). The pooler's
    presence follows `architectures` here (ViTModel has one) and the file at conversion. Another input size resizes
    the pos-embed at run time as transformers' `interpolate_pos_encoding=True` does (bicubic, size-based)."""
    model_type = cfg.get("model_type")
    if model_type not in _HF_VIT_EPS:
        raise CheckpointError(f"transformers config has model_type {model_type!r}; an hf_vit checkpoint needs one of "
                              f"{sorted(_HF_VIT_EPS)} (a CLIP vision tower is --model hf_clip)")
    problems = [f"{k} {cfg[k]!r} (only {ok!r})" for k, ok in (("hidden_act", "gelu"), ("pooler_act", "tanh"))
                if cfg.get(k, ok) != ok]
    if problems:
        raise CheckpointError("transformers ViT config: unsupported settings: " + "; ".join(problems))
    dim, patch = cfg.get("hidden_size", 768), cfg.get("patch_size", 16)
    architectures = cfg.get("architectures") or ["ViTModel"]
    pooler = model_type == "vit" and "ViTModel" in architectures
    return ViTConfig(
        family="hf_vit", width=dim, depth=cfg.get("num_hidden_layers", 12),
        num_heads=cfg.get("num_attention_heads", 12), patch_size=patch,
        pos_grid=_grid(cfg.get("image_size", 224), patch), mlp_hidden=cfg.get("intermediate_size", 3072),
        in_chans=cfg.get("num_channels", 3), qkv_bias=cfg.get("qkv_bias", True),
        norm_eps=float(cfg.get("layer_norm_eps", _HF_VIT_EPS[model_type])),
        pooler_dim=(cfg.get("pooler_output_size") or dim) if pooler else 0, pos_resize="size")


def hf_clip_config(cfg: dict) -> ViTConfig:
    """transformers CLIPVisionConfig (`clip_vision_model`), or CLIPConfig (`clip`: its vision_config, and its
    projection_dim for visual_projection). Missing keys take the config classes' defaults."""
    projection = cfg.get("projection_dim", 512)
    cfg = transformers_vision_config(cfg, "hf_clip", "clip_vision_model", ("clip",))
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise CheckpointError(f"transformers CLIP config: hidden_act {act!r} is not supported (quick_gelu, gelu)")
    dim, patch = cfg.get("hidden_size", 768), cfg.get("patch_size", 32)
    return ViTConfig(
        family="hf_clip", width=dim, depth=cfg.get("num_hidden_layers", 12),
        num_heads=cfg.get("num_attention_heads", 12), patch_size=patch,
        pos_grid=_grid(cfg.get("image_size", 224), patch), mlp_hidden=cfg.get("intermediate_size", 3072),
        in_chans=cfg.get("num_channels", 3), patch_bias=False, norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
        ln_pre=True, proj_dim=projection, act=act, pos_resize="size")


# timm's stock ViT entry points (`vit_<size>_patch<p>_<img>`), as open_clip's TimmModel creates them by name.
_TIMM_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
               "huge": (1280, 32, 16)}
_BIOMEDCLIP_VISION_KW = {"timm_model_name", "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias",
                         "timm_drop", "timm_drop_path", "image_size", "timm_model_kwargs"}


def biomedclip_config(cfg: dict) -> ViTConfig:
    """An open_clip model config whose vision tower is a timm ViT (BiomedCLIP's `open_clip_config.json`, its
    `model_cfg`, or the model config alone). The trunk is timm's `vision_cfg.timm_model_name` entry point with
    `vision_cfg.timm_model_kwargs` on top; its image size is `timm_model_kwargs.img_size`, else `vision_cfg.image_size`,
    else the entry point's own."""
    if isinstance(cfg.get("model_cfg"), dict):
        cfg = cfg["model_cfg"]
    check_keys(cfg, {"embed_dim", "vision_cfg", "text_cfg", "custom_text", "quick_gelu", "cast_dtype",
                     "init_logit_bias", "preprocess_cfg"}, "biomedclip open_clip config")
    v = cfg.get("vision_cfg")
    if not isinstance(v, dict) or "embed_dim" not in cfg:
        raise CheckpointError("biomedclip config: needs `embed_dim` and `vision_cfg` (an open_clip model config)")
    check_keys(v, _BIOMEDCLIP_VISION_KW, "biomedclip vision_cfg")
    name = str(v.get("timm_model_name", ""))
    m = re.fullmatch(r"vit_(tiny|small|base|large|huge)_patch(\d+)_(\d+)(\..*)?", name)
    if not m:
        raise CheckpointError(f"biomedclip config: timm_model_name {name!r} is not supported; medjax reads timm's "
                              f"stock ViTs vit_<{'|'.join(_TIMM_SIZES)}>_patch<P>_<SIZE>")
    problems = []
    if v.get("timm_pool", "") not in ("", None, "token"):
        problems.append(f"timm_pool {v['timm_pool']!r} (only '' = the trunk's CLS pooling)")
    if v.get("timm_proj", "linear") != "linear":
        problems.append(f"timm_proj {v.get('timm_proj')!r} (only 'linear', BiomedCLIP's projection)")
    if problems:
        raise CheckpointError("biomedclip config: unsupported vision_cfg settings: " + "; ".join(problems))
    dim, depth, heads = _TIMM_SIZES[m.group(1)]
    kw = {"embed_dim": dim, "depth": depth, "num_heads": heads, "patch_size": int(m.group(2)),
          "img_size": int(m.group(3))}
    extra = dict(v.get("timm_model_kwargs") or {})
    if "image_size" in v:
        if "img_size" in extra and pair(extra["img_size"]) != pair(v["image_size"]):
            raise CheckpointError(f"biomedclip config: vision_cfg.image_size {v['image_size']} differs from the "
                                  f"trunk's timm_model_kwargs.img_size {extra['img_size']}")
        kw["img_size"] = v["image_size"]
    config = timm_config({**kw, **extra}, "biomedclip")
    return dataclasses.replace(config, proj_dim=cfg["embed_dim"],
                               proj_bias_term=bool(v.get("timm_proj_bias", False)))


def parse_config(family: str, cfg: dict) -> ViTConfig:
    if family == "hf_vit":
        return hf_vit_config(cfg)
    if family == "hf_clip":
        return hf_clip_config(cfg)
    if family == "biomedclip":
        return biomedclip_config(cfg)
    if "model_type" in cfg:
        return transformers_config(cfg, family)
    if family == "dinov2":
        return dinov2_config(cfg)
    if family in ("clip", "coca"):
        return open_clip_config(cfg, family)
    if family == "aimv2":
        return aimv2_config(cfg)
    return timm_config(cfg, family)


def dinov2_resize(config: ViTConfig, style: str) -> ViTConfig:
    """Pick the DINOv2 run-time pos-embed resize: 'official' (facebookresearch/dinov2) or 'transformers'."""
    import dataclasses

    if config.num_registers:  # both implementations agree for the register models: size-based, antialiased
        return config
    if style == "official":
        return dataclasses.replace(config, pos_resize="offset", pos_resize_offset=0.1, pos_resize_antialias=False)
    return dataclasses.replace(config, pos_resize="size", pos_resize_offset=0.0, pos_resize_antialias=False)


# ------------------------------------------------------------------------------------------------ variants

def _hub(dim, depth, heads, registers=False, swiglu=False):
    return {"img_size": 518, "patch_size": 14, "embed_dim": dim, "depth": depth, "num_heads": heads, "mlp_ratio": 4,
            "init_values": 1.0, "ffn_layer": "swiglufused" if swiglu else "mlp", "block_chunks": 0,
            "num_register_tokens": 4 if registers else 0, "interpolate_antialias": registers,
            "interpolate_offset": 0.0 if registers else 0.1}


def _timm(dim, depth, heads, patch):
    return {"img_size": 224, "patch_size": patch, "embed_dim": dim, "depth": depth, "num_heads": heads,
            "mlp_ratio": 4, "qkv_bias": True}


VARIANTS = {}
for _size, _args in {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "g": (1536, 40, 24)}.items():
    for _reg in (False, True):
        VARIANTS[f"dinov2_vit{_size}14{'_reg4' if _reg else ''}"] = ("dinov2", _hub(*_args, _reg, _size == "g"))
VARIANTS.update({
    "mae_vit_base_patch16": ("mae", _timm(768, 12, 12, 16)),
    "mae_vit_large_patch16": ("mae", _timm(1024, 24, 16, 16)),
    "mae_vit_huge_patch14": ("mae", _timm(1280, 32, 16, 14)),
    "deit_base_patch16_224": ("deit", _timm(768, 12, 12, 16)),
    "clip_vit_b16": ("clip", {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768,
                                                                "patch_size": 16}}),
    # open_clip model_configs/coca_ViT-B-32.json and coca_ViT-L-14.json (vision part)
    "coca_vit_b32": ("coca", {"embed_dim": 512, "vision_cfg": {
        "image_size": 224, "layers": 12, "width": 768, "patch_size": 32, "attentional_pool": True,
        "attn_pooler_heads": 8, "output_tokens": True}}),
    "coca_vit_l14": ("coca", {"embed_dim": 768, "vision_cfg": {
        "image_size": 224, "layers": 24, "width": 1024, "patch_size": 14, "attentional_pool": True,
        "attn_pooler_heads": 8, "output_tokens": True}}),
    # apple/ml-aim aimv2_large / aimv2_huge at 224 px
    "aimv2_large_patch14_224": ("aimv2", {"img_size": 224, "patch_size": 14, "embed_dim": 1024,
                                          "mlp_hidden_dim": 2816, "num_blocks": 24, "num_heads": 8}),
    "aimv2_huge_patch14_224": ("aimv2", {"img_size": 224, "patch_size": 14, "embed_dim": 1536,
                                         "mlp_hidden_dim": 4096, "num_blocks": 24, "num_heads": 12}),
})


def _hf_vit(dim, depth, heads, patch, model_type="vit", architecture="ViTModel", eps=None):
    cfg = {"model_type": model_type, "architectures": [architecture], "hidden_size": dim, "num_hidden_layers": depth,
           "num_attention_heads": heads, "intermediate_size": 4 * dim, "patch_size": patch, "image_size": 224}
    return ("hf_vit", cfg | ({"layer_norm_eps": eps} if eps else {}))


def _hf_clip(dim, depth, heads, patch, projection, act="quick_gelu", image=224):
    return ("hf_clip", {"model_type": "clip_vision_model", "hidden_size": dim, "num_hidden_layers": depth,
                        "num_attention_heads": heads, "intermediate_size": 4 * dim, "patch_size": patch,
                        "image_size": image, "projection_dim": projection, "hidden_act": act})


VARIANTS.update({
    # transformers' google/vit-*: ViTModel (with the pooler) for the ImageNet-21k files, ViTForImageClassification
    # (no pooler, its classifier ignored) for the fine-tuned ones
    "vit_base_patch16_224_in21k": _hf_vit(768, 12, 12, 16),
    "vit_large_patch16_224_in21k": _hf_vit(1024, 24, 16, 16),
    "vit_huge_patch14_224_in21k": _hf_vit(1280, 32, 16, 14),
    "vit_base_patch16_224": _hf_vit(768, 12, 12, 16, architecture="ViTForImageClassification"),
    "vit_large_patch16_224": _hf_vit(1024, 24, 16, 16, architecture="ViTForImageClassification"),
    # facebook/vit-msn-*
    "vit_msn_small": _hf_vit(384, 12, 6, 16, "vit_msn", "ViTMSNModel", 1e-6),
    "vit_msn_base": _hf_vit(768, 12, 12, 16, "vit_msn", "ViTMSNModel", 1e-6),
    "vit_msn_large": _hf_vit(1024, 24, 16, 16, "vit_msn", "ViTMSNModel", 1e-6),
    "vit_msn_base_4": _hf_vit(768, 12, 12, 4, "vit_msn", "ViTMSNModel", 1e-6),
    "vit_msn_large_7": _hf_vit(1024, 24, 16, 7, "vit_msn", "ViTMSNModel", 1e-6),
    # facebook/vit-mae-large read as a ViT (the radiology study's MAE-L baseline; `mae_*` is MAE's own reading)
    "vit_mae_large": _hf_vit(1024, 24, 16, 16, "vit_mae", "ViTMAEForPreTraining"),
    # transformers CLIP vision towers: openai/clip-vit-* (quick_gelu), laion/CLIP-ViT-H-14-laion2B-s32B-b79K (gelu)
    "clip_vit_base_patch32": _hf_clip(768, 12, 12, 32, 512),
    "clip_vit_base_patch16": _hf_clip(768, 12, 12, 16, 512),
    "clip_vit_large_patch14": _hf_clip(1024, 24, 16, 14, 768),
    "clip_vit_large_patch14_336": _hf_clip(1024, 24, 16, 14, 768, image=336),
    "clip_vit_huge_patch14_laion2b": _hf_clip(1280, 32, 16, 14, 1024, act="gelu"),
    # open_clip ViT-H-14 (laion2b_s32b_b79k) in open_clip's own naming
    "clip_vit_h14": ("clip", {"embed_dim": 1024, "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280,
                                                                 "head_width": 80, "patch_size": 14}}),
    # microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 (open_clip_config.json's model_cfg, vision part)
    "biomedclip_vit_base_patch16_224": ("biomedclip", {"embed_dim": 512, "vision_cfg": {
        "timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
        "timm_proj": "linear", "image_size": 224}}),
})


def _adjust_hf(config: ViTConfig, fmt: Format, kwargs: dict, options: dict) -> ViTConfig:
    """The transformers ViT pooler and CLIP projection exist when the file holds them (the config cannot say)."""
    if config.family == "hf_vit":
        pooler = fmt.name == "vit_transformers_pooler"
        pooler_dim = (kwargs.get("pooler_output_size") or config.width) if pooler else 0
        return dataclasses.replace(config, pooler_dim=pooler_dim)
    if fmt.name == "clip_transformers":
        return dataclasses.replace(config, proj_dim=None)
    return config


def _adjust_dinov2(config: ViTConfig, fmt: Format, kwargs: dict, options: dict) -> ViTConfig:
    """--dinov2-resize: 'auto' resizes as the implementation the file came from; 'official' / 'transformers' force."""
    style = options.get("dinov2_resize", "auto")
    if style == "auto":
        if ("model_type" in kwargs) == fmt.hf:
            return config  # the config describes the file's own implementation
        style = "transformers" if fmt.hf else "official"
    return dinov2_resize(config, style)


_ADJUST = {"dinov2": _adjust_dinov2, "hf_vit": _adjust_hf, "hf_clip": _adjust_hf}


# ------------------------------------------------------------------------------------------------ linear heads


def attach_linear_head(config: ViTConfig, path: str) -> tuple[ViTConfig, dict, list, dict]:
    """DINOv2's hub linear classifier `dinov2_vit*14[_reg4]_linear[4]_head.pth` (an nn.Linear state dict
    {weight (1000, (1 + L) * D), bias}) for a converted backbone: returns the config with `lc_layers` = L (1 or 4, read
    off the weight's shape), the head's tensors under `lc_head.*`, its key table and its provenance."""
    if config.family != "dinov2":
        raise CheckpointError(f"--linear-head: {path} is a DINOv2 linear-classifier head; the backbone is "
                              f"{config.family}, not dinov2")
    state = read_state_dict(path)
    if set(state) != {"weight", "bias"}:
        raise CheckpointError(f"--linear-head {path}: expected the state dict of one nn.Linear (`weight`, `bias`), "
                              f"got keys {sorted(state)[:10]}")
    weight, bias = state["weight"], state["bias"]
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise CheckpointError(f"--linear-head {path}: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} are "
                              "not an nn.Linear's")
    inputs, width = weight.shape[1], config.width
    layers = inputs // width - 1
    if inputs % width or layers not in (1, 4):
        raise CheckpointError(
            f"--linear-head {path}: its input has {inputs} features; a head on this backbone (width {width}) takes "
            f"(1 + layers) * {width} = {2 * width} (layers 1, `_linear_head.pth`) or {5 * width} (layers 4, "
            "`_linear4_head.pth`): is it the head of another model size?")
    if layers > config.depth:
        raise CheckpointError(f"--linear-head {path}: a {layers}-layer head needs {layers} blocks, the backbone has "
                              f"{config.depth}")
    config = dataclasses.replace(config, lc_layers=layers, lc_classes=int(weight.shape[0]))
    source = {"file": os.path.basename(path), "sha256": sha256(path), "layers": layers, "classes": config.lc_classes}
    return config, {"lc_head.weight": weight, "lc_head.bias": bias}, LINEAR_HEAD_RULES, source


def attach_classifier_head(config: ViTConfig, weight: np.ndarray, bias: np.ndarray) -> tuple[ViTConfig, dict, list]:
    """transformers' `Dinov2[WithRegisters]ForImageClassification` classifier (an nn.Linear on cat(CLS, mean of the
    patch tokens)) is the hub linear head with one layer: stored as `lc_head` (lc_layers 1), run as `lc_logits`."""
    if config.family != "dinov2":
        raise CheckpointError(f"a transformers classifier head goes with a dinov2 backbone, not {config.family}")
    if weight.ndim != 2 or weight.shape[1] != 2 * config.width:
        raise CheckpointError(f"classifier.weight {tuple(weight.shape)}: a Dinov2ForImageClassification head takes "
                              f"2 * {config.width} features (CLS and the patch mean)")
    config = dataclasses.replace(config, lc_layers=1, lc_classes=int(weight.shape[0]))
    return config, {"lc_head.weight": weight, "lc_head.bias": bias}, LINEAR_HEAD_RULES


CONVERTERS = [
    Converter(name, [f for f in FORMATS if f.family == name], lambda kw, name=name: parse_config(name, kw),
              IGNORED_KEYS_DOC[name], _ADJUST.get(name), attach_linear_head, attach_classifier_head)
    for name in ("dinov2", "mae", "deit", "clip", "coca", "aimv2", "hf_vit", "hf_clip", "biomedclip")
]
