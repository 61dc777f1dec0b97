"""Key tables and config reader for the SigLIP family: transformers' `SiglipVisionModel` safetensors (no prefix, as
transformers 5 saves it; `vision_model.` in older files) and whole `SiglipModel` checkpoints (google/siglip-*,
google/siglip2-* fixed resolution, google/medsiglip-448), whose vision tower is taken and whose text tower is
skipped."""

from __future__ import annotations

from medjax.conversion import (
    CheckpointError,
    Converter,
    Format,
    Rule,
    conv,
    dense_rules,
    linear,
    norm_rules,
    pair,
    reshape,
    transformers_vision_config,
)
from medjax.models.siglip.model import FAMILY, SiglipConfig

# ------------------------------------------------------------------------------------------------ key tables

# transformers' on-disk naming (after `vision_model.` is stripped). q/k/v are fused into the blocks' `attn/qkv`; the
# head's nn.MultiheadAttention in_proj (rows q, k, v) is split into its q / k / v projections.
HF_RULES = [
    Rule("embeddings.patch_embedding.weight", "patch_embed/kernel", conv),
    Rule("embeddings.patch_embedding.bias", "patch_embed/bias"),
    Rule("embeddings.position_embedding.weight", "pos_embed", reshape),  # (N, D) -> (1, N, D)
    *norm_rules("encoder.layers.{i}.layer_norm1", "blocks_{i}/norm1"),
    *dense_rules("encoder.layers.{i}.self_attn.q_proj", "blocks_{i}/attn/qkv", (0, 3)),
    *dense_rules("encoder.layers.{i}.self_attn.k_proj", "blocks_{i}/attn/qkv", (1, 3)),
    *dense_rules("encoder.layers.{i}.self_attn.v_proj", "blocks_{i}/attn/qkv", (2, 3)),
    *dense_rules("encoder.layers.{i}.self_attn.out_proj", "blocks_{i}/attn/proj"),
    *norm_rules("encoder.layers.{i}.layer_norm2", "blocks_{i}/norm2"),
    *dense_rules("encoder.layers.{i}.mlp.fc1", "blocks_{i}/mlp/fc1"),
    *dense_rules("encoder.layers.{i}.mlp.fc2", "blocks_{i}/mlp/fc2"),
    *norm_rules("post_layernorm", "post_layernorm"),
    Rule("head.probe", "head/probe"),
    *[Rule("head.attention.in_proj_weight", f"head/{n}/kernel", linear, split=(i, 3)) for i, n in enumerate("qkv")],
    *[Rule("head.attention.in_proj_bias", f"head/{n}/bias", split=(i, 3)) for i, n in enumerate("qkv")],
    *dense_rules("head.attention.out_proj", "head/out_proj"),
    *norm_rules("head.layernorm", "head/norm"),
    *dense_rules("head.mlp.fc1", "head/mlp/fc1"),
    *dense_rules("head.mlp.fc2", "head/mlp/fc2"),
]

# A whole SiglipModel: the text tower and the logit scale / bias; older files also hold int64 position_ids buffers;
# SiglipForImageClassification's classifier.
_IGNORE = [r"text_model\..*", r"logit_scale", r"logit_bias", r"embeddings\.position_ids", r"classifier\..*"]

FORMATS = [
    Format("siglip_transformers", FAMILY, HF_RULES, r"embeddings\.patch_embedding\.weight", ignore=_IGNORE,
           strip_prefixes=("vision_model.",), hf=True),
]

IGNORED_KEYS_DOC = ("text_model.*, logit_scale, logit_bias (a whole SiglipModel), classifier.* "
                    "(SiglipForImageClassification), position_ids buffers")

# ------------------------------------------------------------------------------------------------ configs

_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}


def transformers_config(cfg: dict) -> SiglipConfig:
    """A transformers config.json: SiglipVisionConfig (`siglip_vision_model`) or SiglipConfig (`siglip`: its
    vision_config). Missing keys take SiglipVisionConfig's defaults (google/siglip-base-patch16-224's tower).
    `siglip2` (the NaFlex models: a linear patch embedding over variable-length patch sequences) is another layout."""
    cfg = transformers_vision_config(cfg, FAMILY, "siglip_vision_model", ("siglip",))
    act = cfg.get("hidden_act", "gelu_pytorch_tanh")
    if act not in _ACTS:
        raise CheckpointError(f"transformers SiglipVisionConfig: hidden_act {act!r} is not supported "
                              f"({', '.join(_ACTS)})")
    image, patch = pair(cfg.get("image_size", 224)), pair(cfg.get("patch_size", 16))
    if image[0] != image[1] or patch[0] != patch[1]:
        raise CheckpointError(f"transformers SiglipVisionConfig: image_size {cfg.get('image_size')} and patch_size "
                              f"{cfg.get('patch_size')} must be square (the position table is a square grid)")
    try:
        return SiglipConfig(
            family=FAMILY, width=int(cfg.get("hidden_size", 768)), depth=int(cfg.get("num_hidden_layers", 12)),
            num_heads=int(cfg.get("num_attention_heads", 12)), patch_size=patch[0],
            pos_grid=(image[0] // patch[0], image[0] // patch[0]), mlp_hidden=int(cfg.get("intermediate_size", 3072)),
            in_chans=int(cfg.get("num_channels", 3)), norm_eps=float(cfg.get("layer_norm_eps", 1e-6)),
            act=_ACTS[act], use_head=bool(cfg.get("vision_use_head", True)))
    except ValueError as e:
        raise CheckpointError(f"transformers SiglipVisionConfig: {e}") from e


def parse_config(cfg: dict) -> SiglipConfig:
    if "model_type" not in cfg:
        raise CheckpointError("siglip config: expected a transformers config.json (model_type 'siglip' or "
                              f"'siglip_vision_model'), got keys {sorted(cfg)[:10]}")
    return transformers_config(cfg)


# ------------------------------------------------------------------------------------------------ variants

def _siglip(**vision) -> tuple[str, dict]:
    """A SiglipModel config.json as upstream publishes it: only the fields that differ from the defaults."""
    return FAMILY, {"model_type": "siglip", "vision_config": {"model_type": "siglip_vision_model", **vision}}


_SO400M = {"hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 27,
           "patch_size": 14}

VARIANTS = {
    # google/siglip-so400m-patch14-384/config.json
    "siglip_so400m_patch14_384": _siglip(**_SO400M, image_size=384),
    # google/siglip2-base-patch16-224/config.json: the vision_config is SiglipVisionConfig's defaults
    "siglip2_base_patch16_224": _siglip(),
    # google/siglip2-base-patch16-512/config.json: image_size 512, the rest the defaults
    "siglip2_base_patch16_512": _siglip(image_size=512),
    # google/medsiglip-448: the SigLIP so400m tower at 448 px (vision_config: hidden_size 1152, intermediate_size 4304,
    # 16 heads, 27 layers, patch 14, image_size 448, gelu_pytorch_tanh, layer_norm_eps 1e-6)
    "medsiglip_448": _siglip(**_SO400M, image_size=448, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
}

CONVERTERS = [Converter(FAMILY, FORMATS, parse_config, IGNORED_KEYS_DOC)]
