"""Key tables and config readers for the SAM 2.1 image encoder (family `sam2_hiera`): the official
`sam2.1_hiera_*.pt` files (`{'model': ...}` of the whole SAM2Base; only `image_encoder.*` is used), a bare
`ImageEncoder` state dict, and transformers' `Sam2VisionModel` / `Sam2Model` / `Sam2VideoModel` safetensors."""

from __future__ import annotations

from medjax.conversion import (
    CheckpointError,
    Converter,
    Format,
    Rule,
    check_keys,
    conv_rules,
    dense_rules,
    norm_rules,
    pair,
    transformers_vision_config,
)
from medjax.models.hiera.model import FAMILY, HieraConfig

# ------------------------------------------------------------------------------------------------ key tables


def nchw_to_nhwc(a):  # the (1, C, h, w) pos-embeds are stored channels-last
    return a.transpose(0, 2, 3, 1)


# facebookresearch/sam2 naming, inside `image_encoder.` (trunk = Hiera, neck = FpnNeck).
OFFICIAL_RULES = [
    Rule("trunk.pos_embed", "pos_embed", nchw_to_nhwc),
    Rule("trunk.pos_embed_window", "pos_embed_window", nchw_to_nhwc),
    *conv_rules("trunk.patch_embed.proj", "patch_embed"),
    *norm_rules("trunk.blocks.{i}.norm1", "blocks_{i}/norm1"),
    *dense_rules("trunk.blocks.{i}.proj", "blocks_{i}/proj"),
    *dense_rules("trunk.blocks.{i}.attn.qkv", "blocks_{i}/attn/qkv"),
    *dense_rules("trunk.blocks.{i}.attn.proj", "blocks_{i}/attn/proj"),
    *norm_rules("trunk.blocks.{i}.norm2", "blocks_{i}/norm2"),
    *dense_rules("trunk.blocks.{i}.mlp.layers.0", "blocks_{i}/mlp/fc1"),
    *dense_rules("trunk.blocks.{i}.mlp.layers.1", "blocks_{i}/mlp/fc2"),
    *conv_rules("neck.convs.{i}.conv", "neck/convs_{i}"),
]

# transformers' on-disk naming (Sam2VisionModel; `vision_encoder.` inside Sam2Model / Sam2VideoModel).
HF_RULES = [
    Rule("backbone.pos_embed", "pos_embed", nchw_to_nhwc),
    Rule("backbone.pos_embed_window", "pos_embed_window", nchw_to_nhwc),
    *conv_rules("backbone.patch_embed.projection", "patch_embed"),
    *norm_rules("backbone.blocks.{i}.layer_norm1", "blocks_{i}/norm1"),
    *dense_rules("backbone.blocks.{i}.proj", "blocks_{i}/proj"),
    *dense_rules("backbone.blocks.{i}.attn.qkv", "blocks_{i}/attn/qkv"),
    *dense_rules("backbone.blocks.{i}.attn.proj", "blocks_{i}/attn/proj"),
    *norm_rules("backbone.blocks.{i}.layer_norm2", "blocks_{i}/norm2"),
    *dense_rules("backbone.blocks.{i}.mlp.proj_in", "blocks_{i}/mlp/fc1"),
    *dense_rules("backbone.blocks.{i}.mlp.proj_out", "blocks_{i}/mlp/fc2"),
    *conv_rules("neck.convs.{i}", "neck/convs_{i}"),
]

FORMATS = [
    # sam2.1_hiera_*.pt: the whole SAM2Base; everything outside image_encoder.* (memory attention/encoder, prompt
    # encoder, mask decoder, no_mem_* / no_obj_* embeddings, obj_ptr_proj, mask_downsample) is skipped.
    Format("sam2_official", FAMILY, OFFICIAL_RULES, r"trunk\.patch_embed\.proj\.weight",
           select_prefix="image_encoder."),
    Format("sam2_image_encoder", FAMILY, OFFICIAL_RULES, r"trunk\.patch_embed\.proj\.weight"),  # ImageEncoder alone
    Format("sam2_transformers_vision", FAMILY, HF_RULES, r"backbone\.patch_embed\.projection\.weight", hf=True),
    # Sam2Model / Sam2VideoModel: the vision tower is under vision_encoder.; prompt encoder, mask decoder, memory
    # modules and shared embeddings are skipped.
    Format("sam2_transformers", FAMILY, HF_RULES, r"backbone\.patch_embed\.projection\.weight",
           select_prefix="vision_encoder.", hf=True),
]

IGNORED_KEYS_DOC = ("everything outside image_encoder.* in official SAM 2 files (and outside vision_encoder.* in "
                    "transformers' Sam2Model / Sam2VideoModel): memory attention/encoder, prompt encoder, mask "
                    "decoder, no_mem/no_obj embeddings, obj_ptr_proj, mask_downsample")

# ------------------------------------------------------------------------------------------------ configs

_TARGETS = {  # hydra `_target_` suffixes accepted where a yaml subtree is passed as is
    "image_encoder": "ImageEncoder", "trunk": "Hiera", "neck": "FpnNeck", "position_encoding": "PositionEmbeddingSine"}
_ENCODER_KW = {"scalp", "trunk", "neck", "_target_"}
_TRUNK_KW = {"embed_dim", "num_heads", "drop_path_rate", "q_pool", "q_stride", "stages", "dim_mul", "head_mul",
             "window_pos_embed_bkg_spatial_size", "window_spec", "global_att_blocks", "return_interm_layers",
             "weights_path", "_target_"}
_NECK_KW = {"position_encoding", "d_model", "backbone_channel_list", "kernel_size", "stride", "padding",
            "fpn_interp_model", "fuse_type", "fpn_top_down_levels", "_target_"}
_POS_ENC_KW = {"num_pos_feats", "normalize", "scale", "temperature", "_target_"}


def _check_target(kw: dict, what: str):
    target = kw.get("_target_")
    if target is not None and not str(target).endswith(_TARGETS[what]):
        raise CheckpointError(f"sam2_hiera config: {what}._target_ is {target!r}; medjax ports "
                              f"{_TARGETS[what]} only")


def _config(**kw) -> HieraConfig:
    try:
        return HieraConfig(family=FAMILY, **kw)
    except ValueError as e:
        raise CheckpointError(f"sam2_hiera config: {e}") from e


def official_config(cfg: dict) -> HieraConfig:
    """facebookresearch/sam2 `ImageEncoder` kwargs: {scalp, trunk: Hiera kwargs, neck: FpnNeck kwargs (with
    position_encoding)}, i.e. a yaml's `model.image_encoder` subtree (`_target_` keys allowed). A whole `model` tree
    or `{'image_encoder': ...}` is unwrapped first. Missing arguments take upstream's constructor defaults."""
    if isinstance(cfg.get("model"), dict):
        cfg = cfg["model"]
    if isinstance(cfg.get("image_encoder"), dict):
        cfg = cfg["image_encoder"]
    check_keys(cfg, _ENCODER_KW, "sam2_hiera config (ImageEncoder)")
    _check_target(cfg, "image_encoder")
    if not isinstance(cfg.get("trunk"), dict) or not isinstance(cfg.get("neck"), dict):
        raise CheckpointError("sam2_hiera config: needs `trunk` (Hiera kwargs) and `neck` (FpnNeck kwargs), as in "
                              "the `model.image_encoder` subtree of sam2/configs/sam2.1/*.yaml")
    trunk, neck = cfg["trunk"], cfg["neck"]
    check_keys(trunk, _TRUNK_KW, "sam2_hiera config (trunk: Hiera)")
    check_keys(neck, _NECK_KW, "sam2_hiera config (neck: FpnNeck)")
    _check_target(trunk, "trunk")
    _check_target(neck, "neck")
    pe = neck.get("position_encoding") or {}
    if not isinstance(pe, dict):
        raise CheckpointError("sam2_hiera config: neck.position_encoding must be the PositionEmbeddingSine kwargs")
    check_keys(pe, _POS_ENC_KW, "sam2_hiera config (neck.position_encoding: PositionEmbeddingSine)")
    _check_target(pe, "position_encoding")
    if not trunk.get("return_interm_layers", True):
        raise CheckpointError("sam2_hiera config: trunk.return_interm_layers=False is not supported (the FPN neck "
                              "needs all four stages)")

    # Hiera: width and heads multiply at every stage change (int() after each, as upstream).
    dim, heads, dims, head_list = trunk.get("embed_dim", 96), trunk.get("num_heads", 1), [], []
    for s in range(4):
        if s:
            dim, heads = int(dim * trunk.get("dim_mul", 2.0)), int(heads * trunk.get("head_mul", 2.0))
        dims.append(dim)
        head_list.append(heads)
    q_stride = pair(trunk.get("q_stride", (2, 2)))
    if q_stride[0] != q_stride[1]:
        raise CheckpointError(f"sam2_hiera config: q_stride {list(q_stride)} is not supported (square only; "
                              "upstream divides the window by q_stride[0])")
    stages = tuple(trunk.get("stages", (2, 3, 16, 3)))
    window_spec = tuple(trunk.get("window_spec", (8, 4, 14, 7)))
    if len(stages) != 4 or len(window_spec) != 4:
        raise CheckpointError(f"sam2_hiera config: stages {list(stages)} and window_spec {list(window_spec)} need 4 "
                              "entries each (the FPN neck has 4 levels)")

    channels = list(neck.get("backbone_channel_list", []))
    if channels != dims[::-1]:
        raise CheckpointError(f"sam2_hiera config: neck.backbone_channel_list {channels} must be the trunk's stage "
                              f"widths from coarse to fine, {dims[::-1]} (upstream asserts this)")
    for key, ok in (("kernel_size", 1), ("stride", 1), ("padding", 0)):
        if neck.get(key, ok) != ok:
            raise CheckpointError(f"sam2_hiera config: neck.{key}={neck[key]!r} is not supported (only {ok})")
    levels = neck.get("fpn_top_down_levels")
    levels = tuple(range(4)) if levels is None else tuple(levels)  # FpnNeck's default: every level
    interp = neck.get("fpn_interp_model", "bilinear")
    if interp != "nearest" and any(lv < 3 for lv in levels):
        raise CheckpointError(f"sam2_hiera config: neck.fpn_interp_model={interp!r} is not supported (SAM 2.1 uses "
                              "'nearest'; note FpnNeck's default is 'bilinear', so set it explicitly)")
    return _config(
        embed_dims=dims, num_heads=head_list, stages=stages, window_spec=window_spec,
        global_att_blocks=tuple(trunk.get("global_att_blocks", (12, 16, 20)) or ()),
        pos_embed_bkg=pair(trunk.get("window_pos_embed_bkg_spatial_size", (14, 14))),
        q_pool=trunk.get("q_pool", 3), q_stride=q_stride[0], d_model=neck.get("d_model", 256),
        fpn_top_down_levels=levels, fuse_type=neck.get("fuse_type", "sum"), scalp=cfg.get("scalp", 0))


# PreTrainedConfig's own attributes (transformers 4.x and 5.x), which say nothing about the architecture.
_HF_GENERIC = {
    "_name_or_path", "_commit_hash", "_attn_implementation_autoset", "_attn_implementation", "architectures", "dtype",
    "torch_dtype", "transformers_version", "model_type", "id2label", "label2id", "num_labels", "problem_type",
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "pruned_heads", "tie_word_embeddings", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder", "finetuning_task", "tokenizer_class",
    "prefix", "bos_token_id", "pad_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "initializer_range", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens"}
_HF_VISION_KW = {"backbone_config", "backbone_channel_list", "backbone_feature_sizes", "fpn_hidden_size",
                 "fpn_kernel_size", "fpn_stride", "fpn_padding", "fpn_top_down_levels", "num_feature_levels",
                 "hidden_act", "layer_norm_eps"}
_HF_HIERA_KW = {"hidden_size", "num_attention_heads", "num_channels", "image_size", "patch_kernel_size",
                "patch_stride", "patch_padding", "query_stride", "window_positional_embedding_background_size",
                "num_query_pool_stages", "blocks_per_stage", "embed_dim_per_stage", "num_attention_heads_per_stage",
                "window_size_per_stage", "global_attention_blocks", "mlp_ratio", "hidden_act", "layer_norm_eps"}


def _get(cfg: dict, key: str, default):
    """A transformers config value; None or missing takes the default (as the config classes do)."""
    value = cfg.get(key)
    return default if value is None else value


def _check_hf_keys(cfg: dict, known: set, what: str):
    unknown = sorted(set(cfg) - known - _HF_GENERIC)
    if unknown:
        raise CheckpointError(f"{what}: unsupported keys {unknown}; supported: {sorted(known)}")


def transformers_config(cfg: dict) -> HieraConfig:
    """A transformers config.json: Sam2VisionConfig (`sam2_vision_model`), or Sam2Config / Sam2VideoConfig (`sam2`,
    `sam2_video`), whose `vision_config` is used. Missing keys take transformers' defaults."""
    trunk_only = ("transformers config is a Sam2HieraDetConfig (the trunk alone); sam2_hiera is the trunk + FPN neck: "
                  "convert a Sam2VisionModel, Sam2Model or Sam2VideoModel")
    if cfg.get("model_type") == "sam2_hiera_det_model":
        raise CheckpointError(trunk_only)
    cfg = transformers_vision_config(cfg, FAMILY, "sam2_vision_model", ("sam2", "sam2_video"))
    vision_type = cfg.get("model_type", "sam2_vision_model")  # a Sam2Config's vision_config may omit it
    if vision_type == "sam2_hiera_det_model":
        raise CheckpointError(trunk_only)
    if vision_type != "sam2_vision_model":
        raise CheckpointError(f"transformers config has vision model_type {vision_type!r}; a {FAMILY} checkpoint "
                              "needs 'sam2_vision_model'")
    _check_hf_keys(cfg, _HF_VISION_KW, "transformers Sam2VisionConfig")
    bb = cfg.get("backbone_config") or {}
    if bb.get("model_type", "sam2_hiera_det_model") != "sam2_hiera_det_model":
        raise CheckpointError(f"transformers Sam2VisionConfig: backbone model_type {bb['model_type']!r} is not "
                              "supported (sam2_hiera_det_model only)")
    _check_hf_keys(bb, _HF_HIERA_KW, "transformers Sam2HieraDetConfig (backbone_config)")

    dims = tuple(_get(bb, "embed_dim_per_stage", (96, 192, 384, 768)))
    problems = []
    if bb.get("hidden_size", 96) != dims[0]:
        problems.append(f"hidden_size {bb.get('hidden_size', 96)} differs from embed_dim_per_stage[0] {dims[0]}")
    if bb.get("hidden_act", "gelu") != "gelu":
        problems.append(f"hidden_act {bb['hidden_act']!r} (only 'gelu', the exact erf form)")
    q_stride = pair(_get(bb, "query_stride", (2, 2)))
    if q_stride[0] != q_stride[1]:
        problems.append(f"query_stride {list(q_stride)} (square only)")
    for key, ok in (("fpn_kernel_size", 1), ("fpn_stride", 1), ("fpn_padding", 0)):
        if cfg.get(key, ok) != ok:
            problems.append(f"{key}={cfg[key]!r} (only {ok})")
    channels = list(_get(cfg, "backbone_channel_list", (768, 384, 192, 96)))
    if channels != list(dims[::-1]):
        problems.append(f"backbone_channel_list {channels} is not the stage widths from coarse to fine "
                        f"{list(dims[::-1])}")
    levels = cfg.get("num_feature_levels", 3)
    if not 1 <= levels <= 4:
        problems.append(f"num_feature_levels {levels} (1..4)")
    if problems:
        raise CheckpointError("transformers Sam2VisionConfig: unsupported settings: " + "; ".join(problems))
    top_down = cfg.get("fpn_top_down_levels")
    return _config(
        embed_dims=dims, num_heads=tuple(_get(bb, "num_attention_heads_per_stage", (1, 2, 4, 8))),
        stages=tuple(_get(bb, "blocks_per_stage", (1, 2, 7, 2))),
        window_spec=tuple(_get(bb, "window_size_per_stage", (8, 4, 14, 7))),
        global_att_blocks=tuple(_get(bb, "global_attention_blocks", (5, 7, 9))),
        pos_embed_bkg=pair(_get(bb, "window_positional_embedding_background_size", (7, 7))),
        q_pool=bb.get("num_query_pool_stages", 3), q_stride=q_stride[0], mlp_ratio=float(bb.get("mlp_ratio", 4.0)),
        norm_eps=float(bb.get("layer_norm_eps", 1e-6)), in_chans=bb.get("num_channels", 3),
        patch_kernel=pair(_get(bb, "patch_kernel_size", 7)), patch_stride=pair(_get(bb, "patch_stride", 4)),
        patch_padding=pair(_get(bb, "patch_padding", 3)), d_model=cfg.get("fpn_hidden_size", 256),
        fpn_top_down_levels=(2, 3) if top_down is None else tuple(top_down), scalp=4 - levels)


def parse_config(cfg: dict) -> HieraConfig:
    return transformers_config(cfg) if "model_type" in cfg else official_config(cfg)


# ------------------------------------------------------------------------------------------------ variants

def _image_encoder(embed_dim: int, **trunk) -> dict:
    """The `model.image_encoder` subtree of sam2/configs/sam2.1/sam2.1_hiera_*.yaml (without `_target_`)."""
    dims = [embed_dim * 2 ** s for s in range(4)]
    return {"scalp": 1, "trunk": {"embed_dim": embed_dim, "num_heads": 2, **trunk},
            "neck": {"position_encoding": {"num_pos_feats": 256, "normalize": True, "scale": None,
                                           "temperature": 10000},
                     "d_model": 256, "backbone_channel_list": dims[::-1], "fpn_top_down_levels": [2, 3],
                     "fpn_interp_model": "nearest"}}


VARIANTS = {
    # B+ relies on Hiera's defaults: stages (2,3,16,3), global (12,16,20), windows (8,4,14,7), bkg 14x14.
    "sam2.1_hiera_b+": (FAMILY, _image_encoder(112)),
    "sam2.1_hiera_l": (FAMILY, _image_encoder(144, stages=[2, 6, 36, 4], global_att_blocks=[23, 33, 43],
                                              window_pos_embed_bkg_spatial_size=[7, 7], window_spec=[8, 4, 16, 8])),
}

CONVERTERS = [Converter(FAMILY, FORMATS, parse_config, IGNORED_KEYS_DOC)]
