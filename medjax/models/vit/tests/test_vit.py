"""Architecture facts of the named variants and the conversion-time pos-embed resize."""

import json

import numpy as np
import pytest
import torch

from medjax import conversion, models
from medjax.convert import CONVERTER_VERSION, convert
from medjax.models.vit import convert as vit
from medjax.testing import fixture_path, max_abs

transformers = pytest.importorskip("transformers")


def _hf_count(model_cls, config, skip=()):
    with torch.device("meta"):
        model = model_cls(config)
    return sum(p.numel() for n, p in model.named_parameters() if not any(s in n for s in skip))


def _dinov2_hf(size, registers):
    dim, depth, heads = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "g": (1536, 40, 24)}[size]
    kw = dict(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, patch_size=14, image_size=518,
              use_swiglu_ffn=size == "g")
    if registers:
        return _hf_count(transformers.Dinov2WithRegistersModel,
                         transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **kw), skip=("mask_token",))
    return _hf_count(transformers.Dinov2Model, transformers.Dinov2Config(**kw), skip=("mask_token",))


def _vit_hf(cls, cfg_cls, dim, depth, heads, patch, **extra):
    config = cfg_cls(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=4 * dim,
                     patch_size=patch, image_size=224, **extra)
    return _hf_count(cls, config)


REFERENCE_COUNTS = {  # the same architectures in transformers (PyTorch), counted on the meta device
    **{f"dinov2_vit{s}14{'_reg4' if r else ''}": (lambda s=s, r=r: _dinov2_hf(s, r)) for s in "sblg" for r in (0, 1)},
    "mae_vit_base_patch16": lambda: _vit_hf(transformers.ViTMAEModel, transformers.ViTMAEConfig, 768, 12, 12, 16),
    "mae_vit_large_patch16": lambda: _vit_hf(transformers.ViTMAEModel, transformers.ViTMAEConfig, 1024, 24, 16, 16),
    "mae_vit_huge_patch14": lambda: _vit_hf(transformers.ViTMAEModel, transformers.ViTMAEConfig, 1280, 32, 16, 14),
    "deit_base_patch16_224": lambda: _hf_count(
        transformers.ViTModel, transformers.ViTConfig(), skip=("pooler",)),
    "clip_vit_b16": lambda: _hf_count(transformers.CLIPVisionModelWithProjection, transformers.CLIPVisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16,
        image_size=224, projection_dim=512)),
    "aimv2_large_patch14_224": lambda: _hf_count(transformers.Aimv2VisionModel, transformers.Aimv2VisionConfig(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=8, patch_size=14,
        image_size=224, use_head=False)),
    "aimv2_huge_patch14_224": lambda: _hf_count(transformers.Aimv2VisionModel, transformers.Aimv2VisionConfig(
        hidden_size=1536, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=12, patch_size=14,
        image_size=224, use_head=False)),
    "coca_vit_b32": lambda: _coca_count(768, 12, 32, 512),
    "coca_vit_l14": lambda: _coca_count(1024, 24, 14, 768),
    # transformers' ViTModel (pooler) / ViTForImageClassification trunk (no pooler), ViTMSNModel, CLIP vision towers
    "vit_base_patch16_224_in21k": lambda: _vit_hf(transformers.ViTModel, transformers.ViTConfig, 768, 12, 12, 16),
    "vit_large_patch16_224_in21k": lambda: _vit_hf(transformers.ViTModel, transformers.ViTConfig, 1024, 24, 16, 16),
    "vit_huge_patch14_224_in21k": lambda: _vit_hf(transformers.ViTModel, transformers.ViTConfig, 1280, 32, 16, 14),
    "vit_base_patch16_224": lambda: _hf_count(transformers.ViTModel, transformers.ViTConfig(), skip=("pooler",)),
    "vit_large_patch16_224": lambda: _hf_count(transformers.ViTModel, transformers.ViTConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096), skip=("pooler",)),
    **{f"vit_msn_{name}": (lambda a=args: _vit_hf(transformers.ViTMSNModel, transformers.ViTMSNConfig, *a))
       for name, args in {"small": (384, 12, 6, 16), "base": (768, 12, 12, 16), "large": (1024, 24, 16, 16),
                          "base_4": (768, 12, 12, 4), "large_7": (1024, 24, 16, 7)}.items()},
    "vit_mae_large": lambda: _vit_hf(transformers.ViTMAEModel, transformers.ViTMAEConfig, 1024, 24, 16, 16),
    **{name: (lambda a=args: _clip_hf(*a)) for name, args in {
        "clip_vit_base_patch32": (768, 12, 12, 32, 512), "clip_vit_base_patch16": (768, 12, 12, 16, 512),
        "clip_vit_large_patch14": (1024, 24, 16, 14, 768), "clip_vit_large_patch14_336": (1024, 24, 16, 14, 768, 336),
        "clip_vit_huge_patch14_laion2b": (1280, 32, 16, 14, 1024), "clip_vit_h14": (1280, 32, 16, 14, 1024)}.items()},
    # timm's vit_base_patch16_224 trunk (= transformers' ViT without pooler) + open_clip's bias-free head.proj
    "biomedclip_vit_base_patch16_224": lambda: _hf_count(transformers.ViTModel, transformers.ViTConfig(),
                                                         skip=("pooler",)) + 768 * 512,
}


def _clip_hf(dim, depth, heads, patch, projection, image=224):
    return _hf_count(transformers.CLIPVisionModelWithProjection, transformers.CLIPVisionConfig(
        hidden_size=dim, intermediate_size=4 * dim, num_hidden_layers=depth, num_attention_heads=heads,
        patch_size=patch, image_size=image, projection_dim=projection))


def _coca_count(width, layers, patch, out_dim):
    """open_clip's CoCa tower from reference parts: transformers' CLIP vision trunk (conv without bias, CLS, pos,
    ln_pre, blocks), torch's nn.MultiheadAttention(out_dim, 8, kdim=vdim=width) pooler with 256 queries and its two
    LayerNorms, ln_post over out_dim and the (out_dim, out_dim) projection."""
    trunk = _hf_count(transformers.CLIPVisionModel, transformers.CLIPVisionConfig(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=width // 64,
        patch_size=patch, image_size=224), skip=("post_layernorm",))
    with torch.device("meta"):
        mha = torch.nn.MultiheadAttention(out_dim, 8, kdim=width, vdim=width)
    pooler = sum(p.numel() for p in mha.parameters()) + 256 * out_dim + 2 * out_dim + 2 * width
    return trunk + pooler + 2 * out_dim + out_dim * out_dim


@pytest.mark.parametrize("name", sorted(vit.VARIANTS))
def test_variant_parameter_counts_match_upstream(name):
    family, kwargs = vit.VARIANTS[name]
    ours = models.count_params(models.param_shapes(vit.parse_config(family, kwargs)))
    assert ours == REFERENCE_COUNTS[name]()


@pytest.mark.parametrize("family,antialias", [("mae", False), ("clip", True)])
def test_load_time_pos_embed_resize(tmp_path, family, antialias):
    """Converting for a larger image size resizes the stored pos-embed once, as MAE's interpolate_pos_embed
    (bicubic) and open_clip's resize_pos_embed (antialiased bicubic) do."""
    cfg = json.load(open(fixture_path(family, "config.json")))
    if family == "clip":
        cfg["vision_cfg"]["image_size"] = 96
        name, key = "open_clip_model.safetensors", "visual.positional_embedding"
    else:
        cfg["img_size"] = 96
        name, key = "checkpoint.pth", "pos_embed"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    convert(fixture_path(family, name), str(tmp_path / "out"), family, str(tmp_path / "cfg.json"))
    _, params_vars, _ = models.load_pretrained(str(tmp_path / "out"))
    params = params_vars["params"]
    state = conversion.read_state_dict(fixture_path(family, name))
    pos = torch.from_numpy(state[key]).reshape(1, 17, -1)
    grid = pos[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False,
                                           antialias=antialias)
    expected = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 36, -1)], dim=1)
    assert max_abs(params["pos_embed"], expected.numpy()) <= 1e-6


def test_fixed_grid_families_reject_other_input_sizes(tmp_path):
    import jax.numpy as jnp

    convert(fixture_path("mae", "checkpoint.pth"), str(tmp_path / "out"), "mae",
            fixture_path("mae", "config.json"))
    config, params_vars, _ = models.load_pretrained(str(tmp_path / "out"))
    params = params_vars["params"]
    with pytest.raises(ValueError, match="convert the checkpoint again with `img_size`"):
        models.build_backbone(config).apply({"params": params}, jnp.zeros((1, 96, 96, 3)))


def test_metadata(tmp_path):
    meta = convert(fixture_path("deit", "checkpoint.pth"), str(tmp_path / "out"), "deit",
                   fixture_path("deit", "config.json"))
    saved = json.load(open(tmp_path / "out" / "medjax.json"))
    assert saved["family"] == "deit" and saved["architecture"]["width"] == 64
    assert saved["source"]["file"] == "checkpoint.pth" and saved["source"]["format"] == "deit_official"
    import hashlib

    assert saved["source"]["sha256"] == hashlib.sha256(open(fixture_path("deit", "checkpoint.pth"),
                                                            "rb").read()).hexdigest()
    assert saved["converter_version"] == CONVERTER_VERSION
    state = conversion.read_state_dict(fixture_path("deit", "checkpoint.pth"))
    assert meta["num_params"] == saved["num_params"] == sum(v.size for k,
                                                            v in state.items() if not k.startswith("head."))


def test_coca_fused_pooler_matches_torch_multihead_attention(matmul_f32):
    """A pooler whose query and token widths agree is stored with a fused in_proj_weight (newer open_clip):
    the split rules feed q/k/v, checked against torch's nn.MultiheadAttention as open_clip's pooler runs it."""
    import jax.numpy as jnp

    from medjax.conversion import apply_rules
    from medjax.models.layers import AttentionalPooler
    from medjax.models.vit.convert import COCA_RULES
    from medjax.pretrained import flatten

    torch.manual_seed(0)
    dim, heads, queries = 32, 8, 6
    mha, ln_q, ln_k = torch.nn.MultiheadAttention(dim, heads,
                                                  batch_first=True), torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
    query = torch.randn(queries, dim)
    state = {f"attn_pool.attn.{k}": v for k, v in mha.state_dict().items()}
    state |= {f"attn_pool.ln_q.{k}": v for k, v in ln_q.state_dict().items()}
    state |= {f"attn_pool.ln_k.{k}": v for k, v in ln_k.state_dict().items()}
    state = {k: (v + 0.1 * torch.randn(v.shape)).numpy() for k, v in state.items()} | {"attn_pool.query": query.numpy()}
    assert "attn_pool.attn.in_proj_weight" in state
    pooler = AttentionalPooler(dim, heads, queries, 1e-5)
    x = np.random.default_rng(0).standard_normal((2, 5, dim)).astype(np.float32)
    shapes = pooler.init(jax_key(), jnp.asarray(x))["params"]
    expected = {f"attn_pool/{k}": tuple(v.shape) for k, v in flatten(shapes).items()}
    params = apply_rules(state, COCA_RULES, [], expected, "fused", "coca")["params"]["attn_pool"]
    got = pooler.apply({"params": params}, jnp.asarray(x))
    for name, module in (("attn", mha), ("ln_q", ln_q), ("ln_k", ln_k)):
        module.load_state_dict({k.split(".", 2)[-1]: torch.from_numpy(v) for k, v in state.items()
                                if k.startswith(f"attn_pool.{name}.")})
    with torch.no_grad():
        q = ln_q(torch.from_numpy(state["attn_pool.query"])).expand(2, -1, -1)
        kv = ln_k(torch.from_numpy(x))
        ref = mha(q, kv, kv, need_weights=False)[0].numpy()
    assert max_abs(got, ref) <= 2e-5


def jax_key():
    import jax

    return jax.random.key(0)
