"""LoRA and BitFit on the tiny DINOv2 with the engine's optimizer and train step: what trains, and what stays
bit-identical."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import converters
from conftest import fixture_path
from medjax import classifier, models, optim, pretrained, train
from medjax.models.vit import ViTConfig
from medjax.pretrained import flatten, unflatten
from medjax.protocols import peft

OPTIM = ml_collections.ConfigDict({"lr": 1e-2, "weight_decay": 1e-5, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "clip": 1.0,
                                   "schedule": "constant"})


@pytest.fixture(scope="module")
def classifier_and_params(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dino"))
    converters.convert(fixture_path("dinov2", "checkpoint.pth"), out, "dinov2", fixture_path("dinov2", "config.json"))
    config, backbone_vars, _ = pretrained.load(out)
    backbone = backbone_vars["params"]
    # classifier.build_classifier's tree, assembled without its jitted init (seconds on 2 CPU cores)
    head = {"kernel": np.random.default_rng(0).standard_normal((48, 3)).astype(np.float32) * 0.1,
            "bias": np.zeros(3, np.float32)}
    return classifier.Classifier(config, 3), {"backbone": backbone, "head": head}


def _batch(seed=0, n=8):
    rng = np.random.default_rng(seed)
    return {"image": jnp.asarray(rng.standard_normal((n, 28, 28, 3)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 3, n), jnp.int32)}


def _train(model, params, trainable, steps=3):
    tx, _ = optim.make_optimizer(OPTIM, params, trainable, 10, 0)
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                             rng=jax.random.PRNGKey(0))
    step = jax.jit(train.make_train_step(model, tx, "multiclass", trainable))
    for i in range(steps):
        state, out = step(state, _batch(i))
        assert bool(out["finite"])
    return jax.device_get(state.params), state.opt_state


def _changed(before, after):
    a, b = flatten(before), flatten(after)
    return {k for k in a if not np.array_equal(np.asarray(a[k]), np.asarray(b[k]))}


def test_lora_targets_qkv_and_mlp_kernels():
    shapes = models.param_shapes(ViTConfig("dinov2", 48, 2, 3, 14, (4, 4), 64, ffn="swiglu"))
    found = peft.lora_targets({"backbone": shapes, "head": {"kernel": np.zeros((48, 3))}})
    assert found == [f"backbone/blocks_{i}/{m}/kernel" for i in range(2) for m in ("attn/qkv", "mlp/w12", "mlp/w3")]


def test_lora_with_zero_b_is_the_base_model_and_merges_w_plus_scaled_ab(classifier_and_params):
    model, params = classifier_and_params
    lmodel, lparams = peft.add_lora(model, params, jax.random.PRNGKey(1))
    assert sorted(k for k in flatten(lparams["lora"])) == sorted(
        f"backbone/blocks_{i}/{m}/kernel/lora_{ab}" for i in range(2) for m in ("attn/qkv", "mlp/fc1", "mlp/fc2")
        for ab in "ab")
    a = flatten(lparams["lora"])["backbone/blocks_0/attn/qkv/kernel/lora_a"]
    assert a.shape == (48, 48) and np.abs(a).max() <= 1 / np.sqrt(48) and np.any(a != 0)
    images = _batch()["image"]
    base = jax.jit(model.apply)({"params": params}, images)
    lora_apply = jax.jit(lmodel.apply)
    assert np.array_equal(np.asarray(lora_apply({"params": lparams}, images)), np.asarray(base))  # bit-identical
    # with B != 0 the forward is the base model's with W + (alpha / r) A @ B, computed here in numpy
    rng = np.random.default_rng(0)
    lora = jax.tree_util.tree_map(lambda x: rng.standard_normal(x.shape).astype(np.float32) * 0.1, lparams["lora"])
    merged = flatten(params)
    for path, ab in flatten(lora).items():
        if path.endswith("lora_a"):
            kernel = path[:-len("/lora_a")]
            merged[kernel] = np.asarray(merged[kernel]) + (16 / 48) * (ab @ flatten(lora)[f"{kernel}/lora_b"])
    expected = jax.jit(model.apply)({"params": unflatten(merged)}, images)
    got = lora_apply({"params": {**params, "lora": lora}}, images)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.abs(np.asarray(got) - np.asarray(base)).max() > 1e-3


def test_lora_trains_only_adapters_and_head(classifier_and_params):
    model, params = classifier_and_params
    lmodel, lparams = peft.add_lora(model, params, jax.random.PRNGKey(1))
    trainable = peft.lora_mask(lparams)
    after, opt_state = _train(lmodel, lparams, trainable)
    changed = _changed(lparams, after)
    expected = {k for k in flatten(lparams) if not k.startswith("backbone/")}
    assert changed == expected  # every adapter and the head moved ...
    assert not any(k.startswith("backbone/") for k in changed)  # ... and every base weight is bit-identical
    # B starts at zero (only B moves in the first step, A from the second on); optimizer state only for trained leaves
    assert all(np.any(v != 0) for k, v in flatten(after["lora"]).items() if k.endswith("lora_b"))
    moments = sum(np.size(x) for x in jax.tree_util.tree_leaves(opt_state) if np.ndim(x) > 0)
    assert moments == 2 * peft.count_trainable(lparams, trainable)
    assert peft.count_trainable(lparams, trainable) < 0.8 * sum(np.size(v) for v in flatten(lparams).values())


def test_bitfit_trains_only_biases_and_head(classifier_and_params):
    model, params = classifier_and_params
    trainable = peft.bitfit_mask(params)
    after, _ = _train(model, params, trainable)
    changed = _changed(params, after)
    biases = {k for k in flatten(params) if k.startswith("backbone/") and k.endswith("/bias")}
    assert any("norm" in k for k in biases) and any("qkv" in k for k in biases)
    assert changed == biases | {"head/kernel", "head/bias"}
    no_norms = flatten(peft.bitfit_mask(params, include_norms=False))
    assert not any(v for k, v in no_norms.items() if "norm" in k) and no_norms["backbone/blocks_0/mlp/fc1/bias"]
