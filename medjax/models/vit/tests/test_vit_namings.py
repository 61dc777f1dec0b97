"""The radiology study's ViT baselines in medjax's ViT family: transformers' ViTModel / ViTMSNModel /
ViTForImageClassification (`hf_vit`), CLIPVisionModel[WithProjection] / CLIPModel (`hf_clip`), BiomedCLIP's open_clip
file (`biomedclip`), and DINOv2's hub linear classifiers (`--linear-head`).

Proof: the public fixtures (upstream outputs) through both CLIs, and transformers' PyTorch models with perturbed weights
saved with `save_pretrained` and converted from those files."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from medjax import conversion, models, testing
from medjax.conversion import CheckpointError
from medjax.convert import convert
from medjax.testing import PARITY_TOL, fixture_path, max_abs, perturb_

transformers = pytest.importorskip("transformers")

# ------------------------------------------------------------------------------------------------ fixtures

CASES = [  # (fixture, checkpoint, --model, extra CLI arguments)
    ("hf_vit", "model.safetensors", "hf_vit", ()),
    ("hf_clip", "model.safetensors", "hf_clip", ()),
    ("biomedclip", "open_clip_pytorch_model.bin", "biomedclip", ()),
    ("dinov2_lc", "checkpoint.pth", "dinov2", ("--linear-head", fixture_path("dinov2_lc", "linear_head.pth"))),
]
# DINOv2's interpolated pos-embed is a (1, ...) debug array; test_dinov2_lc_fixture_pos_embed checks it instead.
NOT_PRODUCED = {"debug_interpolated_pos_embed"}


@pytest.mark.parametrize("family,checkpoint,model,extra", CASES, ids=[c[0] for c in CASES])
def test_fixture_parity_through_clis(tmp_path, family, checkpoint, model, extra):
    got, expected, _ = testing.convert_and_embed(tmp_path, family, checkpoint, model,
                                                 fixture_path(family, "config.json"), *extra)
    assert len(testing.assert_fixture_outputs(got, expected, family, NOT_PRODUCED)) >= 2
    assert "linear_head_input" in got.files and "attention_head_input" in got.files


def test_dinov2_lc_fixture_pos_embed():
    from medjax.conversion import read_state_dict
    from medjax.models.vit import convert as vit
    from medjax.models.vit import interpolate_pos_embed

    config = vit.dinov2_config(json.load(open(fixture_path("dinov2_lc", "config.json"))))
    pos = read_state_dict(fixture_path("dinov2_lc", "checkpoint.pth"))["pos_embed"]
    got = interpolate_pos_embed(config, jnp.asarray(pos), (4, 4), (56, 56))
    assert max_abs(got, np.load(fixture_path("dinov2_lc", "expected.npz"))["debug_interpolated_pos_embed"]) <= 1e-6


def test_fixture_linear_head_is_stored_with_its_provenance(tmp_path):
    meta = convert(fixture_path("dinov2_lc", "checkpoint.pth"), str(tmp_path / "jx"), "dinov2",
                   fixture_path("dinov2_lc", "config.json"),
                   linear_head=fixture_path("dinov2_lc", "linear_head.pth"))
    config, variables, saved = models.load_pretrained(str(tmp_path / "jx"))
    head = torch.load(fixture_path("dinov2_lc", "linear_head.pth"), weights_only=True)
    np.testing.assert_array_equal(variables["params"]["lc_head"]["kernel"], head["weight"].numpy().T)
    np.testing.assert_array_equal(variables["params"]["lc_head"]["bias"], head["bias"].numpy())
    assert (config.lc_layers, config.lc_classes) == (1, 1000)
    assert saved["source"]["linear_head"]["file"] == "linear_head.pth" and saved["source"]["linear_head"]["layers"] == 1
    backbone = sum(v.size for k, v in conversion.read_state_dict(
        fixture_path("dinov2_lc", "checkpoint.pth")).items() if k != "mask_token")
    assert meta["num_params"] == backbone + head["weight"].numel() + head["bias"].numel()


# ------------------------------------------------------------------------------------------------ transformers

def _save(model, path):
    model.eval()
    model.save_pretrained(path)
    return str(path)


def _images(batch, height, width, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 3, height, width)).astype(np.float32)


def _medjax(params_dir, images):
    config, variables, _ = models.load_pretrained(params_dir)
    with jax.default_matmul_precision("float32"):
        out = models.build_backbone(config).apply(variables, jnp.asarray(images.transpose(0, 2, 3, 1)))
    return config, variables, {k: np.asarray(v) for k, v in out.items()}


def _check(got: dict, pairs: dict, tol=PARITY_TOL):
    for key, ref in pairs.items():
        diff = max_abs(got[key], ref)
        assert diff <= tol, f"{key}: max abs diff {diff:.3g}"


VIT_KW = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=96, patch_size=8,
              image_size=40)


def test_transformers_vit_model_with_pooler(tmp_path):
    """google/vit-*-in21k layout: ViTModel with its tanh pooler, LayerNorm eps 1e-12; the linear head takes the
    radiology study's feature, the CLS of `hidden_states[-1]` (before the final LayerNorm)."""
    torch.manual_seed(0)
    model = perturb_(transformers.ViTModel(transformers.ViTConfig(**VIT_KW)), seed=1)
    meta = convert(_save(model, tmp_path / "hf"), str(tmp_path / "jx"), "hf_vit")
    assert meta["source"]["format"] == "vit_transformers_pooler"
    assert meta["num_params"] == sum(p.numel() for p in model.parameters())
    images = _images(2, 40, 40)
    with torch.no_grad():
        ref = model(torch.from_numpy(images), output_hidden_states=True)
    config, _, got = _medjax(str(tmp_path / "jx"), images)
    assert config.norm_eps == 1e-12 and config.pooler_dim == 48
    last = ref.last_hidden_state.numpy()
    _check(got, {"last_hidden_state": last, "cls": last[:, 0], "pooler_output": ref.pooler_output.numpy(),
                 "linear_head_input": ref.hidden_states[-1][:, 0].numpy(), "attention_head_input": last[:, 1:]})
    # another, non-square input size: the pos-embed follows as with transformers' interpolate_pos_encoding=True
    images = _images(2, 56, 32, seed=9)
    with torch.no_grad():
        ref = model(torch.from_numpy(images), interpolate_pos_encoding=True)
    _, _, got = _medjax(str(tmp_path / "jx"), images)
    _check(got, {"last_hidden_state": ref.last_hidden_state.numpy(), "pooler_output": ref.pooler_output.numpy()})


def test_transformers_vit_msn_and_classification_files(tmp_path):
    """facebook/vit-msn-* (ViTMSNModel: eps 1e-6, no pooler) and google/vit-*-224 (ViTForImageClassification: `vit.`
    prefix, classifier ignored, no pooler)."""
    torch.manual_seed(0)
    msn = perturb_(transformers.ViTMSNModel(transformers.ViTMSNConfig(**VIT_KW)), seed=2)
    cls = perturb_(transformers.ViTForImageClassification(transformers.ViTConfig(**VIT_KW, num_labels=5)), seed=3)
    images = _images(2, 40, 40, seed=1)
    for name, model, trunk in (("msn", msn, msn), ("cls", cls, cls.vit)):
        meta = convert(_save(model, tmp_path / name), str(tmp_path / f"{name}_jx"), "hf_vit")
        assert meta["source"]["format"] == "vit_transformers"
        with torch.no_grad():
            ref = trunk(torch.from_numpy(images), output_hidden_states=True)
        config, _, got = _medjax(str(tmp_path / f"{name}_jx"), images)
        assert config.pooler_dim == 0 and "pooler_output" not in got
        assert config.norm_eps == (1e-6 if name == "msn" else 1e-12)
        last = ref.last_hidden_state.numpy()
        _check(got, {"last_hidden_state": last, "cls": last[:, 0],
                     "linear_head_input": ref.hidden_states[-1][:, 0].numpy()})


def test_transformers_vit_mae_file_read_as_a_vit(tmp_path):
    """facebook/vit-mae-large as the radiology study loads it (a ViTMAEForPreTraining file read as a ViT): the
    decoder is ignored, the encoder runs unmasked."""
    torch.manual_seed(0)
    config = transformers.ViTMAEConfig(**VIT_KW, mask_ratio=0.0, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                                       decoder_num_attention_heads=2, decoder_intermediate_size=64)
    model = perturb_(transformers.ViTMAEForPreTraining(config), seed=13)
    meta = convert(_save(model, tmp_path / "hf"), str(tmp_path / "jx"), "hf_vit")
    assert meta["num_params"] == sum(p.numel() for p in model.vit.parameters())
    images = _images(2, 40, 40, seed=10)
    noise = torch.arange(25, dtype=torch.float32).expand(2, 25)  # mask ratio 0 still shuffles by argsort(noise)
    with torch.no_grad():
        ref = model.vit(torch.from_numpy(images), noise=noise, output_hidden_states=True)
    _, _, got = _medjax(str(tmp_path / "jx"), images)
    _check(got, {"last_hidden_state": ref.last_hidden_state.numpy(),
                 "linear_head_input": ref.hidden_states[-1][:, 0].numpy()})


def test_transformers_vit_taps_are_the_unnormed_hidden_states(tmp_path):
    """The protocols' taps of an hf_vit backbone are `hidden_states[-n:]` as transformers returns them (the radiology
    study's get_intermediate_layers), not normed by the final LayerNorm."""
    torch.manual_seed(0)
    model = perturb_(transformers.ViTModel(transformers.ViTConfig(**VIT_KW)), seed=4)
    convert(_save(model, tmp_path / "hf"), str(tmp_path / "jx"), "hf_vit")
    config, variables, _ = models.load_pretrained(str(tmp_path / "jx"))
    images = _images(2, 40, 40, seed=2)
    with torch.no_grad():
        hidden = [h.numpy() for h in model(torch.from_numpy(images), output_hidden_states=True).hidden_states]
    fn = models.family("hf_vit").feature_fn(config, 2)
    with jax.default_matmul_precision("float32"):
        taps = fn(variables, jnp.asarray(images.transpose(0, 2, 3, 1)))
    _check(taps, {"cls": np.stack([hidden[-2][:, 0], hidden[-1][:, 0]], axis=1),
                  "patch_mean": hidden[-1][:, 1:].mean(axis=1)})


CLIP_KW = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96, patch_size=8,
               image_size=32, projection_dim=24)


def test_transformers_clip_with_projection(tmp_path):
    """openai/clip-vit-* layout: quick_gelu, pre_layrnorm, pooler = post_layernorm(CLS), bias-free projection."""
    torch.manual_seed(0)
    model = perturb_(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**CLIP_KW)), seed=5)
    convert(_save(model, tmp_path / "hf"), str(tmp_path / "jx"), "hf_clip")
    images = _images(2, 32, 32, seed=3)
    with torch.no_grad():
        ref = model.vision_model(torch.from_numpy(images))
        embeds = model.visual_projection(ref.pooler_output)
    config, _, got = _medjax(str(tmp_path / "jx"), images)
    assert config.act == "quick_gelu" and config.norm_eps == 1e-5
    last = ref.last_hidden_state.numpy()
    _check(got, {"last_hidden_state": last, "pooler_output": ref.pooler_output.numpy(),
                 "image_embeds": embeds.numpy(), "linear_head_input": last[:, 0]})


def test_transformers_whole_clip_model_and_vision_only(tmp_path):
    """A whole CLIPModel file (text tower, logit_scale and a legacy int64 position_ids buffer ignored), with GELU as
    laion/CLIP-ViT-H-14 uses; and a CLIPVisionModel file, which has no projection."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    vision = {k: v for k, v in CLIP_KW.items() if k != "projection_dim"} | {"hidden_act": "gelu"}
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model = perturb_(transformers.CLIPModel(transformers.CLIPConfig(vision_config=vision, text_config=text,
                                                                    projection_dim=20)), seed=6)
    path = _save(model, tmp_path / "clip")
    state = load_file(os.path.join(path, "model.safetensors"))
    state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]  # as files saved by older transformers
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    meta = convert(path, str(tmp_path / "clip_jx"), "hf_clip")
    assert meta["source"]["format"] == "clip_transformers_projection"
    images = _images(2, 32, 32, seed=4)
    with torch.no_grad():
        embeds = model.get_image_features(pixel_values=torch.from_numpy(images))
        embeds = getattr(embeds, "pooler_output", embeds)  # transformers 5 may return an output object
        ref = model.vision_model(torch.from_numpy(images))
    config, _, got = _medjax(str(tmp_path / "clip_jx"), images)
    assert config.act == "gelu" and config.proj_dim == 20
    _check(got, {"image_embeds": embeds.numpy(), "last_hidden_state": ref.last_hidden_state.numpy()})

    vision_only = perturb_(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CLIP_KW)), seed=7)
    meta = convert(_save(vision_only, tmp_path / "v"), str(tmp_path / "v_jx"), "hf_clip")
    assert meta["source"]["format"] == "clip_transformers"
    with torch.no_grad():
        ref = vision_only(torch.from_numpy(images))
    _, _, got = _medjax(str(tmp_path / "v_jx"), images)
    assert "image_embeds" not in got
    _check(got, {"pooler_output": ref.pooler_output.numpy(), "last_hidden_state": ref.last_hidden_state.numpy()})


# ------------------------------------------------------------------------------------------------ BiomedCLIP


def _timm_from_transformers_vit(state: dict) -> dict:
    """transformers ViT state -> timm VisionTransformer naming (written from the two upstream codebases, independently
    of the converter's table)."""
    out = {"cls_token": state["embeddings.cls_token"], "pos_embed": state["embeddings.position_embeddings"],
           "patch_embed.proj.weight": state["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": state["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": state["layernorm.weight"], "norm.bias": state["layernorm.bias"]}
    i = 0
    while f"encoder.layer.{i}.layernorm_before.weight" in state:
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"norm1.{kind}"] = state[src + f"layernorm_before.{kind}"]
            out[dst + f"norm2.{kind}"] = state[src + f"layernorm_after.{kind}"]
            out[dst + f"attn.qkv.{kind}"] = torch.cat(
                [state[src + f"attention.attention.{n}.{kind}"] for n in ("query", "key", "value")])
            out[dst + f"attn.proj.{kind}"] = state[src + f"attention.output.dense.{kind}"]
            out[dst + f"mlp.fc1.{kind}"] = state[src + f"intermediate.dense.{kind}"]
            out[dst + f"mlp.fc2.{kind}"] = state[src + f"output.dense.{kind}"]
        i += 1
    return out


def test_biomedclip_tower_against_a_transformers_vit(tmp_path):
    """A BiomedCLIP-layout file of another size (3 blocks, 6x6 grid, eps 1e-6, a projection with bias) built from a
    transformers ViT: the converter reads `visual.trunk.*` + `visual.head.proj`, ignores the text tower, and the
    projected normed CLS matches."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    vit = perturb_(transformers.ViTModel(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=128, patch_size=16,
        image_size=96, layer_norm_eps=1e-6), add_pooling_layer=False), seed=8)
    trunk = _timm_from_transformers_vit(load_file(os.path.join(_save(vit, tmp_path / "hf"), "model.safetensors")))
    proj, bias = torch.randn(16, 32) / 32 ** 0.5, torch.randn(16) * 0.1
    state = {f"visual.trunk.{k}": v for k, v in trunk.items()} | {
        "visual.head.proj.weight": proj, "visual.head.proj.bias": bias, "logit_scale": torch.tensor(4.6),
        "text.transformer.embeddings.word_embeddings.weight": torch.randn(10, 8),
        "text.transformer.embeddings.position_ids": torch.arange(4)[None], "text.proj.0.weight": torch.randn(8, 8)}
    torch.save(state, tmp_path / "open_clip_pytorch_model.bin")
    cfg = {"embed_dim": 16, "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_pool": "",
                                           "timm_proj": "linear", "timm_proj_bias": True, "image_size": 96,
                                           "timm_model_kwargs": {"embed_dim": 32, "depth": 3, "num_heads": 2,
                                                                 "mlp_ratio": 4.0}},
           "text_cfg": {"hf_model_name": "any"}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    meta = convert(str(tmp_path / "open_clip_pytorch_model.bin"), str(tmp_path / "jx"), "biomedclip",
                   str(tmp_path / "cfg.json"))
    assert meta["source"]["ignored_keys_outside_prefix"] == 4
    images = _images(2, 96, 96, seed=5)
    with torch.no_grad():
        last = vit(torch.from_numpy(images)).last_hidden_state
    _, _, got = _medjax(str(tmp_path / "jx"), images)
    features = (last[:, 0] @ proj.T + bias).numpy()
    _check(got, {"trunk_tokens": last.numpy(), "image_features": features, "linear_head_input": features})


def test_biomedclip_config_refusals():
    from medjax.models.vit.convert import biomedclip_config

    ok = {"embed_dim": 512, "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_pool": "",
                                           "timm_proj": "linear", "image_size": 224}}
    config = biomedclip_config({"model_cfg": ok, "preprocess_cfg": {}})  # the hub's open_clip_config.json
    assert (config.width, config.depth, config.pos_grid, config.proj_dim, config.norm_eps) == (768, 12, (14, 14),
                                                                                               512, 1e-6)
    for change, match in ((("timm_pool", "avg"), "timm_pool"), (("timm_proj", "mlp"), "timm_proj"),
                          (("timm_model_name", "convnext_base"), "timm_model_name")):
        bad = {**ok, "vision_cfg": {**ok["vision_cfg"], change[0]: change[1]}}
        with pytest.raises(CheckpointError, match=match):
            biomedclip_config(bad)


# ------------------------------------------------------------------------------------------------ DINOv2 linear heads


def test_dinov2_linear4_head_with_registers(tmp_path):
    """`_reg4_linear4_head.pth`: the final-normed CLS of each of the last 4 blocks, then the mean of the last block's
    normed patch tokens (the 4 registers excluded), against transformers' Dinov2WithRegistersModel + nn.Linear."""
    torch.manual_seed(0)
    model = perturb_(transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=5, num_attention_heads=2, patch_size=14, image_size=56,
        num_register_tokens=4)), seed=9)
    head = torch.nn.Linear(5 * 32, 1000)
    perturb_(head, seed=10)
    torch.save(head.state_dict(), tmp_path / "dinov2_vits14_reg4_linear4_head.pth")
    testing.run_cli("converters", _save(model, tmp_path / "hf"), str(tmp_path / "jx"), "--model", "dinov2",
                    "--linear-head", str(tmp_path / "dinov2_vits14_reg4_linear4_head.pth"))
    images = _images(2, 56, 56, seed=6)
    with torch.no_grad():
        hidden = model(torch.from_numpy(images), output_hidden_states=True).hidden_states
        normed = [model.layernorm(h) for h in hidden[-4:]]
        linear_input = torch.cat([h[:, 0] for h in normed] + [normed[-1][:, 5:].mean(dim=1)], dim=1)
        logits = head(linear_input)
    config, variables, got = _medjax(str(tmp_path / "jx"), images)
    assert (config.lc_layers, config.num_registers) == (4, 4)
    _check(got, {"lc_linear_input": linear_input.numpy(), "lc_logits": logits.numpy()})
    # the scanned block layout taps the same last 4 blocks
    import dataclasses

    from medjax.models.vit import stack_blocks

    scanned = models.build_backbone(dataclasses.replace(config, scan=True))
    with jax.default_matmul_precision("float32"):
        out = scanned.apply({"params": stack_blocks(variables["params"])}, jnp.asarray(images.transpose(0, 2, 3, 1)))
    _check(out, {"lc_linear_input": linear_input.numpy(), "lc_logits": logits.numpy()})


def test_linear_head_refusals(tmp_path):
    torch.save({"weight": torch.zeros(1000, 3 * 48), "bias": torch.zeros(1000)}, tmp_path / "wrong_size.pth")
    torch.save({"linear.weight": torch.zeros(1000, 96)}, tmp_path / "not_linear.pth")
    ckpt, cfg = fixture_path("dinov2_lc", "checkpoint.pth"), fixture_path("dinov2_lc", "config.json")
    with pytest.raises(CheckpointError, match=r"144 features.*\(1 \+ layers\) \* 48"):
        convert(ckpt, str(tmp_path / "a"), "dinov2", cfg, linear_head=str(tmp_path / "wrong_size.pth"))
    with pytest.raises(CheckpointError, match="one nn.Linear"):
        convert(ckpt, str(tmp_path / "b"), "dinov2", cfg, linear_head=str(tmp_path / "not_linear.pth"))
    proc = testing.run_cli("converters", fixture_path("hf_vit", "model.safetensors"), str(tmp_path / "c"), "--model",
                           "hf_vit", "--config", fixture_path("hf_vit", "config.json"), "--linear-head",
                           fixture_path("dinov2_lc", "linear_head.pth"), check=False)
    assert proc.returncode == 2 and "backbone is hf_vit, not dinov2" in proc.stderr
    assert not os.path.exists(tmp_path / "c" / "medjax.json")


# ------------------------------------------------------------------------------------------------ the trainer


@pytest.mark.parametrize("family,checkpoint,freeze", [("hf_clip", "model.safetensors", "partial"),
                                                     ("biomedclip", "open_clip_pytorch_model.bin", "full")])
def test_trains_in_the_engine(tmp_path, family, checkpoint, freeze):
    """A converted fixture in the trainer's build path (medjax.engine.build) with grayscale data: two steps train the
    head and the blocks the freeze setting selects (partial: from block 1)."""
    from medjax import engine
    from medjax.schema import make

    convert(fixture_path(family, checkpoint), str(tmp_path / "jx"), family,
            fixture_path(family, "config.json"))
    size = np.load(fixture_path(family, "images.npy")).shape[-1]
    cfg = make({"model.family": family, "model.pretrained": str(tmp_path / "jx"), "model.freeze": freeze,
                "model.unfreeze_from_block": 1, "image_size": size, "compute_dtype": "float32", "optim.lr": 1e-2,
                "batch_size": 4})
    eng = engine.build(cfg, num_classes=3, channels=1, task="multiclass", total_steps=4)
    before, changed = testing.train_two_steps(eng, size)
    assert {k for k in changed if k.startswith("backbone/patch_embed")} == (
        {"backbone/patch_embed/kernel", "backbone/patch_embed/bias"} & set(before) if freeze == "full" else set())
    assert any(k.startswith("backbone/blocks_0/") for k in changed) == (freeze == "full")
    assert any(k.startswith("backbone/blocks_1/") for k in changed)
    assert any(not k.startswith("backbone/") for k in changed)


# ------------------------------------------------------------------------------------------------ full size


@pytest.mark.slow
def test_full_size_vit_base_in21k(tmp_path):
    """google/vit-base-patch16-224-in21k as a ViTModel (86.4M parameters with the pooler, random perturbed weights)
    converts under its variant name and matches at 224 px (1e-4)."""
    torch.manual_seed(0)
    model = perturb_(transformers.ViTModel(transformers.ViTConfig()), seed=11)
    meta = convert(_save(model, tmp_path / "hf"), str(tmp_path / "jx"), "vit_base_patch16_224_in21k")
    assert meta["num_params"] == sum(p.numel() for p in model.parameters())
    images = _images(1, 224, 224, seed=7)
    with torch.no_grad():
        ref = model(torch.from_numpy(images), output_hidden_states=True)
    _, _, got = _medjax(str(tmp_path / "jx"), images)
    _check(got, {"last_hidden_state": ref.last_hidden_state.numpy(), "pooler_output": ref.pooler_output.numpy(),
                 "linear_head_input": ref.hidden_states[-1][:, 0].numpy()}, tol=1e-4)


@pytest.mark.slow
def test_full_size_clip_vit_base_patch16(tmp_path):
    """openai/clip-vit-base-patch16 as CLIPVisionModelWithProjection (quick_gelu; random perturbed weights) under its
    variant name, at 224 px (1e-4)."""
    from medjax.models.vit.convert import VARIANTS

    torch.manual_seed(0)
    cfg = {k: v for k, v in VARIANTS["clip_vit_base_patch16"][1].items() if k != "model_type"}
    model = perturb_(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**cfg)), seed=12)
    meta = convert(_save(model, tmp_path / "hf"), str(tmp_path / "jx"), "clip_vit_base_patch16")
    assert meta["num_params"] == sum(p.numel() for p in model.parameters())
    images = _images(1, 224, 224, seed=8)
    with torch.no_grad():
        ref = model(torch.from_numpy(images))
    _, _, got = _medjax(str(tmp_path / "jx"), images)
    _check(got, {"last_hidden_state": ref.last_hidden_state.numpy(), "image_embeds": ref.image_embeds.numpy()},
           tol=1e-4)
