"""medjax.explain: attention rollout against a direct numpy ViT + rollout, Grad-CAM against the textbook formula,
occlusion against a window-by-window loop, and localisation: models trained on images whose label depends on one
known region put the peak of their maps there."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import classifier, engine, explain, sharding
from medjax.schema import make

TINY_VIT = dict(family="dinov2", width=32, depth=3, num_heads=4, patch_size=4, pos_grid=(8, 8), mlp_hidden=64,
                layerscale=True)


def _classifier(overrides, num_classes=3, channels=3, image_size=32, seed=0):
    c = make({"image_size": image_size, "compute_dtype": "float32", **overrides})
    model, variables = classifier.build_classifier(c.model, num_classes, channels, image_size, jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed + 1)  # move every variable off its init (zero biases, unit LayerScale...)
    variables = jax.tree_util.tree_map(lambda v: v + rng.normal(0, 0.05, v.shape).astype(v.dtype), variables)
    return model, variables


# ------------------------------------------------------------------------------------------------ numpy references


def _layer_norm(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _dense(x, p):
    return x @ p["kernel"] + p.get("bias", 0)


def _gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _numpy_blocks(x, params, depth, heads, eps, layerscale):
    """Pre-norm transformer blocks; returns the output and each block's attention probabilities (B, H, T, T)."""
    attentions = []
    for i in range(depth):
        p = params[f"blocks_{i}"]
        b, t, d = x.shape
        qkv = _dense(_layer_norm(x, p["norm1"], eps), p["attn"]["qkv"]).reshape(b, t, 3, heads, d // heads)
        q, k, v = (np.transpose(qkv[:, :, j], (0, 2, 1, 3)) for j in range(3))
        a = _softmax(q @ np.swapaxes(k, -1, -2) / np.sqrt(d // heads))
        attentions.append(a)
        y = _dense(np.transpose(a @ v, (0, 2, 1, 3)).reshape(b, t, d), p["attn"]["proj"])
        x = x + (y * p["ls1"]["gamma"] if layerscale else y)
        y = _dense(_gelu(_dense(_layer_norm(x, p["norm2"], eps), p["mlp"]["fc1"])), p["mlp"]["fc2"])
        x = x + (y * p["ls2"]["gamma"] if layerscale else y)
    return x, attentions


def _numpy_rollout(attentions):
    result = np.eye(attentions[0].shape[-1])
    for a in attentions:
        a = 0.5 * a.mean(axis=1) + 0.5 * np.eye(a.shape[-1])
        result = (a / a.sum(-1, keepdims=True)) @ result
    return result


def _numpy_dinov2(images, p, cfg):
    """A DINOv2 forward at the stored grid (no pos-embed resize): tokens before the final norm, attentions."""
    b, h, w, c = images.shape
    s = cfg["patch_size"]
    patches = images.reshape(b, h // s, s, w // s, s, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, s * s * c)
    x = patches @ p["patch_embed"]["kernel"].reshape(-1, cfg["width"]) + p["patch_embed"]["bias"]
    x = np.concatenate([np.broadcast_to(p["cls_token"], (b, 1, cfg["width"])), x], axis=1) + p["pos_embed"]
    registers = cfg.get("num_registers", 0)
    if registers:
        x = np.concatenate([x[:, :1], np.broadcast_to(p["reg_tokens"], (b, registers, cfg["width"])), x[:, 1:]], 1)
    return _numpy_blocks(x, p, cfg["depth"], cfg["num_heads"], 1e-6, True)


def _as64(tree):
    return jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), tree)


@pytest.mark.parametrize("registers", [0, 2])
def test_attention_rollout_equals_numpy(registers, matmul_f32):
    cfg = dict(TINY_VIT, num_registers=registers)
    model, variables = _classifier({"model.family": "dinov2", "model.architecture": cfg})
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    p = _as64(variables["params"])
    x, attentions = _numpy_dinov2(images.astype(np.float64), p["backbone"], cfg)
    # the numpy forward is the model's: its logits agree
    logits = _dense(_layer_norm(x, p["backbone"]["norm"], 1e-6)[:, 0], p["head"])
    np.testing.assert_allclose(np.asarray(model.apply(variables, images)), logits, atol=1e-5)
    expected = _numpy_rollout(attentions)[:, 0, 1 + registers:].reshape(2, 8, 8)
    got = np.asarray(jax.jit(lambda v, x: explain.attention_rollout(model, v, x))(variables, images))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(expected[0], expected[0].mean(), rtol=1e-3)  # a map, not a constant


def test_attention_rollout_through_the_attention_head(matmul_f32):
    """The Y-model: the head's CLS row over its tokens (the backbone's patch tokens before the final norm) times the
    backbone's patch rows."""
    model, variables = _classifier({"model.family": "dinov2", "model.architecture": TINY_VIT,
                                    "model.head": "attention",
                                    "model.attention_head.width": 16, "model.attention_head.depth": 2,
                                    "model.attention_head.num_heads": 2, "model.attention_head.grid": 8})
    images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    p = _as64(variables["params"])
    x, backbone_attn = _numpy_dinov2(images.astype(np.float64), p["backbone"], TINY_VIT)
    h = p["head"]
    tokens = _layer_norm(_dense(x[:, 1:], h["in_proj"]), h["in_norm"], 1e-5)
    tokens = np.concatenate([np.broadcast_to(h["cls_token"], (2, 1, 16)), tokens], axis=1) + h["pos_embed"]
    y, head_attn = _numpy_blocks(tokens, h, 2, 2, 1e-6, False)
    logits = _dense(_layer_norm(y, h["norm"], 1e-6)[:, 0], h["fc"])
    np.testing.assert_allclose(np.asarray(model.apply(variables, images)), logits, atol=1e-5)
    head_rows = _numpy_rollout(head_attn)[:, 0, 1:]
    expected = np.einsum("bn,bnm->bm", head_rows, _numpy_rollout(backbone_attn)[:, 1:, 1:]).reshape(2, 8, 8)
    got = np.asarray(explain.attention_rollout(model, variables, jnp.asarray(images)))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-8)


def test_mae_rollout_reads_the_mean_of_the_patch_rows(matmul_f32):
    cfg = dict(TINY_VIT, family="mae", layerscale=False)
    model, variables = _classifier({"model.family": "mae", "model.architecture": cfg})
    images = np.random.default_rng(2).normal(size=(1, 32, 32, 3)).astype(np.float32)
    p = _as64(variables["params"]["backbone"])
    b, s = 1, 4
    patches = images.astype(np.float64).reshape(b, 8, s, 8, s, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, 48)
    x = patches @ p["patch_embed"]["kernel"].reshape(-1, 32) + p["patch_embed"]["bias"]
    x = np.concatenate([np.broadcast_to(p["cls_token"], (b, 1, 32)), x], axis=1) + p["pos_embed"]
    _, attentions = _numpy_blocks(x, p, 3, 4, 1e-6, False)
    expected = _numpy_rollout(attentions)[:, 1:, 1:].mean(axis=1).reshape(1, 8, 8)
    np.testing.assert_allclose(np.asarray(explain.attention_rollout(model, variables, jnp.asarray(images))),
                               expected, rtol=1e-5, atol=1e-8)


def test_gradcam_equals_the_textbook_formula(matmul_f32):
    """Selvaraju et al.: a_k = mean_ij d y_c / d A_ij^k, L = ReLU(sum_k a_k A^k), on the last block's map of a small
    ResNet with an MLP head (so the gradient differs between classes and images); the gradient of the head is
    written out by hand."""
    arch = {"block": "basic", "layers": (1, 1, 1, 1), "num_classes": 0, "img_size": 96}
    model, variables = _classifier({"model.family": "resnet", "model.architecture": arch, "model.head": "mlp",
                                    "model.mlp_hidden": 16}, num_classes=4, image_size=96)
    images = np.random.default_rng(3).normal(size=(3, 96, 96, 3)).astype(np.float32)
    classes = np.array([0, 3, 1])
    _, state = model.apply(variables, images, capture_intermediates=lambda m, _: m.name == "layer4_0",
                           mutable=["intermediates"])
    a = np.asarray(state["intermediates"]["backbone"]["layer4_0"]["__call__"][0], np.float64)  # (B, 3, 3, 512)
    h = _as64(variables["params"]["head"])
    pooled = a.mean(axis=(1, 2))
    hidden = _dense(pooled, h["fc1"])
    np.testing.assert_allclose(np.asarray(model.apply(variables, images)),
                               _dense(np.maximum(hidden, 0), h["fc2"]), rtol=1e-4, atol=1e-5)  # A is the map pooled
    # dy_c/dpooled = W1 diag(relu'(hidden)) W2[:, c]; dpooled/dA_ij = 1 / (h w)
    d_pooled = np.einsum("kj,bj,jb->bk", h["fc1"]["kernel"], (hidden > 0).astype(np.float64),
                         h["fc2"]["kernel"][:, classes])
    d_a = np.broadcast_to(d_pooled[:, None, None, :] / (a.shape[1] * a.shape[2]), a.shape)
    alpha = d_a.mean(axis=(1, 2))
    expected = np.maximum(np.einsum("bhwk,bk->bhw", a, alpha), 0)
    got = np.asarray(jax.jit(lambda v, x, c: explain.gradcam(model, v, x, c))(variables, images, classes))
    assert got.shape == (3, 3, 3) and expected.max() > 0
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * expected.max())
    other = np.asarray(explain.gradcam(model, variables, jnp.asarray(images), jnp.asarray([1, 0, 3])))
    assert not np.allclose(other, got)  # another class, another map


def test_gradcam_on_a_module_that_returns_a_list_of_maps(matmul_f32):
    """SAM 2 Hiera: the family names `neck#2`, the FPN level the features are pooled from (`vision_features`); with
    a linear head the textbook weights are W[:, c] / (h w)."""
    from medjax import models

    arch = dict(family="sam2_hiera", embed_dims=(8, 16, 32, 64), num_heads=(1, 1, 2, 2), stages=(1, 1, 2, 1),
                window_spec=(4, 2, 2, 1), global_att_blocks=(3,), pos_embed_bkg=(4, 4), d_model=16)
    model, variables = _classifier({"model.family": "sam2_hiera", "model.architecture": arch}, num_classes=3,
                                   image_size=64)
    assert models.family("sam2_hiera").gradcam_layer(model.backbone) == "neck#2"
    images = np.random.default_rng(5).normal(size=(2, 64, 64, 3)).astype(np.float32)
    classes = np.array([2, 0])
    backbone = models.build_backbone(model.backbone)
    vision = np.asarray(backbone.apply({"params": variables["params"]["backbone"]}, images)["vision_features"],
                        np.float64).transpose(0, 2, 3, 1)  # (B, 4, 4, 16)
    w = np.asarray(variables["params"]["head"]["kernel"], np.float64)
    expected = np.maximum(np.einsum("bhwk,kb->bhw", vision, w[:, classes] / 16), 0)
    got = np.asarray(explain.gradcam(model, variables, jnp.asarray(images), jnp.asarray(classes)))
    assert expected.max() > 0
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * expected.max())


def test_every_family_names_its_default_method():
    from medjax import models
    from medjax.models.vit import ViTConfig

    assert models.family("dinov2").explain_method(ViTConfig(**TINY_VIT)) == "attention"
    coca = ViTConfig(**dict(TINY_VIT, family="coca", attn_pool_queries=4, proj_dim=8))
    assert models.family("coca").explain_method(coca) == "occlusion"  # pooled by cross-attention: no rollout
    for name in ("resnet", "densenet", "vgg", "sam2_hiera", "vmamba", "sam_vit"):
        assert models.family(name).explain_method(None) == "gradcam", name


def test_occlusion_equals_a_window_by_window_loop():
    model, variables = _classifier({"model.family": "dinov2", "model.architecture": TINY_VIT}, num_classes=3)
    image = np.random.default_rng(4).normal(size=(1, 32, 32, 3)).astype(np.float32)
    probability = jax.jit(lambda x: jax.nn.softmax(model.apply(variables, x)))
    got = np.asarray(explain.occlusion(model, variables, jnp.asarray(image), jnp.asarray([2]), "multiclass",
                                       window=8, stride=6))[0]
    base = float(probability(image)[0, 2])
    total, count = np.zeros((32, 32)), np.zeros((32, 32))
    for top in (0, 6, 12, 18, 24):  # the last window ends at the border
        for left in (0, 6, 12, 18, 24):
            occluded = image.copy()
            occluded[:, top:top + 8, left:left + 8] = 0
            total[top:top + 8, left:left + 8] += base - float(probability(occluded)[0, 2])
            count[top:top + 8, left:left + 8] += 1
    np.testing.assert_allclose(got, total / count, atol=2e-6)


# ------------------------------------------------------------------------------------------------ localisation


def _region_data(n, size, seed):
    """Noise with a dark square outside the top-left quadrant in every image; class 1 adds a bright square inside
    the top-left quadrant: the label depends on that region only."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.5, (n, size, size, 1)).astype(np.float32)
    y = (np.arange(n) % 2).astype(np.int32)
    side = size // 4
    for i in range(n):
        while True:
            top, left = rng.integers(0, size - side, 2)
            if top >= size // 2 or left >= size // 2:
                break
        x[i, top:top + side, left:left + side] -= 2.0
        if y[i]:
            top, left = rng.integers(0, size // 2 - side + 1, 2)
            x[i, top:top + side, left:left + side] += 2.0
    return x, y


def _train(overrides, size, steps=150, batch=32):
    c = make({"image_size": size, "model.freeze": "full", "optim.lr": 1e-3, "optim.warmup_steps": 0,
              "compute_dtype": "float32", "batch_size": batch, **overrides})
    e = engine.build(c, num_classes=2, channels=1, task="multiclass", total_steps=steps)
    x, y = _region_data(512, size, 0)
    state = e.state
    for step in range(steps):
        rows = np.random.default_rng(step).choice(len(x), batch, replace=False)
        state, _ = e.train_step(state, sharding.global_batch({"image": x[rows], "label": y[rows]}, e.mesh))
    variables = e.variables_of(state)
    test_x, test_y = _region_data(64, size, 1)
    accuracy = float((np.asarray(e.eval_step(variables, test_x)).argmax(1) == test_y).mean())
    assert accuracy > 0.95, accuracy
    return e.model, variables, test_x[test_y == 1][:16]


def _peaks_in_top_left(maps) -> int:
    hits = 0
    for m in maps:
        i, j = np.unravel_index(np.argmax(m), m.shape)
        hits += int(i < m.shape[0] // 2 and j < m.shape[1] // 2)
    return hits


@pytest.mark.parametrize("family", ["dinov2", "densenet"])
def test_maps_peak_on_the_region_that_decides_the_label(family):
    if family == "dinov2":
        arch = dict(family="dinov2", width=32, depth=2, num_heads=2, patch_size=4, pos_grid=(8, 8), mlp_hidden=64,
                    layerscale=True, in_chans=1)
        size, method = 32, "attention"
    else:  # a small DenseNet: an 8x8 last feature map at 64 px
        arch = {"growth_rate": 8, "block_config": (2, 2), "num_init_features": 16, "bn_size": 2, "num_classes": 0,
                "img_size": 64}
        size, method = 64, "gradcam"
    model, variables, positives = _train({"model.family": family, "model.architecture": arch}, size)
    ones = jnp.ones(len(positives), jnp.int32)
    maps = np.asarray(explain.make_explainer(method, model, "multiclass")(variables, positives, ones))
    assert maps.shape == (16, 8, 8)
    hits = _peaks_in_top_left(maps)
    assert hits >= 12, f"{method}: {hits} of 16 maps peak in the top-left quadrant (chance: 4)"
    occlusion_maps = np.asarray(explain.occlusion(model, variables, jnp.asarray(positives[:8]), ones[:8],
                                                  "multiclass", window=size // 4, stride=size // 8))
    assert _peaks_in_top_left(occlusion_maps) >= 6
