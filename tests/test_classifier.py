"""The classifier around the backbones: the DeiT "Y-model" attention head against the same composition in PyTorch,
the grayscale stem reduction, freezing and the optimizer state it leaves out."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import converters
from medjax import classifier, engine, models, optim, pretrained, rules
from medjax.models.vit import ViTConfig
from medjax.schema import make
from medjax.testing import PARITY_TOL, fixture_path, max_abs, perturb_

transformers = pytest.importorskip("transformers")


def _dino_cfg(**kw):
    """The `model` section of a study config (medjax.schema.make) with these model fields."""
    return make({"model.family": "dinov2", **{f"model.{k}": v for k, v in kw.items()}}).model


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("dino")
    converters.convert(fixture_path("dinov2", "checkpoint.pth"), str(out), "dinov2", fixture_path("dinov2",
                                                                                                  "config.json"))
    return str(out)


def test_attention_head_matches_torch_composition(tmp_path, dino_dir, matmul_f32):
    """tokens -> Dense -> LayerNorm(1e-5) -> DeiT (CLS, pos-embed bicubic-resized 4x4 -> 2x2, blocks, norm) -> CLS
    -> Dense, with the DeiT body from a converted checkpoint, vs the same ops on transformers' ViTModel."""
    torch.manual_seed(0)
    vit = perturb_(transformers.ViTModel(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=16, image_size=64,
        layer_norm_eps=1e-6), add_pooling_layer=False), seed=11).eval()
    vit.save_pretrained(tmp_path / "deit")
    converters.convert(str(tmp_path / "deit"), str(tmp_path / "deit_jx"), "deit")
    cfg = _dino_cfg(pretrained=dino_dir, head="attention")
    cfg.attention_head.deit_params = str(tmp_path / "deit_jx")
    model, variables = classifier.build_classifier(cfg, 4, 3, 28, jax.random.PRNGKey(0))  # 28 px -> 2x2 tokens
    params = variables["params"]
    images = np.random.default_rng(0).standard_normal((2, 28, 28, 3)).astype(np.float32)
    logits = model.apply({"params": params}, jnp.asarray(images))

    tokens = models_tokens(dino_dir, images).copy()
    h = params["head"]
    with torch.no_grad():
        x = _torch(tokens) @ _torch(h["in_proj"]["kernel"]) + _torch(h["in_proj"]["bias"])
        x = torch.nn.functional.layer_norm(x, (32,), _torch(h["in_norm"]["scale"]),
                                           _torch(h["in_norm"]["bias"]), 1e-5)
        pos = vit.embeddings.position_embeddings
        grid = pos[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
        grid = torch.nn.functional.interpolate(grid, size=(2, 2), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 4, 32)], dim=1)
        x = torch.cat([vit.embeddings.cls_token.expand(2, -1, -1), x], dim=1) + pos
        for layer in vit.layers:
            x = layer(x, None)
        x = vit.layernorm(x)[:, 0]
        ref = x @ _torch(h["fc"]["kernel"]) + _torch(h["fc"]["bias"])
    assert max_abs(logits, ref.numpy()) <= PARITY_TOL
    # gradients reach the DeiT pos-embed through the resize
    grads = jax.grad(lambda p: model.apply({"params": p}, jnp.asarray(images)).sum())(params)
    assert np.abs(np.asarray(grads["head"]["pos_embed"][:, 1:])).max() > 0


def _torch(x):
    return torch.from_numpy(np.array(x, copy=True))


def models_tokens(params_dir, images):
    from medjax import models

    config, params_vars, _ = models.load_pretrained(params_dir)

    params = params_vars["params"]
    return np.asarray(models.build_backbone(config).apply({"params": params},
                                                          jnp.asarray(images))["attention_head_input"])


@pytest.mark.parametrize("mode", ["red", "sum"])
def test_grayscale_stem(dino_dir, mode, matmul_f32):
    """1-channel input through the reduced stem equals the RGB model on the equivalent RGB image."""
    gray_model, gray_vars = classifier.build_classifier(_dino_cfg(pretrained=dino_dir, grayscale=mode), 2, 1, 56,
                                                        jax.random.PRNGKey(0))
    rgb_model, rgb_vars = classifier.build_classifier(_dino_cfg(pretrained=dino_dir), 2, 3, 56, jax.random.PRNGKey(0))
    gray_params, rgb_params = gray_vars["params"], rgb_vars["params"]
    rgb_params["head"] = gray_params["head"]
    gray = np.random.default_rng(1).standard_normal((2, 56, 56, 1)).astype(np.float32)
    rgb = np.concatenate([gray, 0 * gray, 0 * gray], -1) if mode == "red" else np.repeat(gray, 3, -1)
    got = gray_model.apply({"params": gray_params}, jnp.asarray(gray))
    ref = rgb_model.apply({"params": rgb_params}, jnp.asarray(rgb))
    assert max_abs(got, ref) <= PARITY_TOL
    assert gray_params["backbone"]["patch_embed"]["kernel"].shape[2] == 1


def test_freezing_and_optimizer_state(dino_dir):
    for freeze, block in [("frozen", 0), ("full", 0), ("partial", 1)]:
        config = make({"model.family": "dinov2", "model.pretrained": dino_dir, "model.freeze": freeze,
                       "model.unfreeze_from_block": block, "image_size": 56, "optim.weight_decay": 0.0})
        e = engine.build(config, num_classes=2, channels=3, task="multiclass", total_steps=10, warmup_steps=2)
        flat = pretrained.flatten(jax.device_get(e.state.params))
        n_head = sum(v.size for k, v in flat.items() if k.startswith("head/"))
        m = pretrained.flatten(e.trainable)
        expected_trained = {"frozen": n_head, "full": sum(v.size for v in flat.values())}.get(freeze)
        if freeze == "partial":
            assert not m["backbone/blocks_0/attn/qkv/kernel"] and m["backbone/blocks_1/attn/qkv/kernel"]
            assert not m["backbone/patch_embed/kernel"] and not m["backbone/pos_embed"] and m["backbone/norm/scale"]
            expected_trained = sum(v.size for k, v in flat.items() if m[k])
        moments = sum(x.size for x in jax.tree_util.tree_leaves(e.state.opt_state) if x.ndim > 0)
        assert moments == 2 * expected_trained, freeze  # Adam's mu and nu for trained parameters only


def test_reference_schedule_overshoot():
    schedule = optim.reference_schedule(1e-4, 10)
    values = np.array([float(schedule(i)) for i in range(15)])
    assert values[0] == pytest.approx(1e-8)
    np.testing.assert_allclose(values[11:], 1e-8 + 11 * (1e-4 - 1e-8) / 10, rtol=1e-6)  # lr * (1 + 1/W), flat after
    assert np.all(np.diff(values[:12]) > 0)


def test_layer_decay_scales():
    params = {"backbone": {"patch_embed": {"kernel": np.zeros(1)}, "blocks_0": {"w": np.zeros(1)},
                           "blocks_1": {"w": np.zeros(1)}, "norm": {"scale": np.zeros(1)}}, "head": {"k": np.zeros(1)}}
    backbone = ViTConfig("dinov2", 48, 2, 3, 14, (4, 4), 64)
    lr_rules = rules.lr_scale_rules(make({"optim.layer_decay": 0.5}).optim, models.family("dinov2"), backbone)
    scales = pretrained.flatten(rules.lr_scales(params, lr_rules))
    assert scales == {"backbone/patch_embed/kernel": 0.125, "backbone/blocks_0/w": 0.25, "backbone/blocks_1/w": 0.5,
                      "backbone/norm/scale": 1.0, "head/k": 1.0}

