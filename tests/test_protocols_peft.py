"""LoRA and BitFit on the tiny DINOv2 through the engine's one build path: what trains, and what stays
bit-identical; then through the main trainer (checkpoints, exact resume, metrics.json)."""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import converters
from medjax import classifier, engine, models, peft
from medjax.models.vit import ViTConfig
from medjax.pretrained import flatten, unflatten
from medjax.schema import make
from medjax.testing import ROOT, fixture_path


@pytest.fixture(scope="module")
def classifier_and_params(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dino"))
    converters.convert(fixture_path("dinov2", "checkpoint.pth"), out, "dinov2", fixture_path("dinov2", "config.json"))
    config, backbone_vars, _ = models.load_pretrained(out)
    backbone = backbone_vars["params"]
    # classifier.build_classifier's tree, assembled without its jitted init (seconds on 2 CPU cores)
    head = {"kernel": np.random.default_rng(0).standard_normal((48, 3)).astype(np.float32) * 0.1,
            "bias": np.zeros(3, np.float32)}
    return classifier.Classifier(config, 3), {"backbone": backbone, "head": head}


def _batch(seed=0, n=8):
    rng = np.random.default_rng(seed)
    return {"image": jnp.asarray(rng.standard_normal((n, 28, 28, 3)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 3, n), jnp.int32)}


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dino_dir"))
    converters.convert(fixture_path("dinov2", "checkpoint.pth"), out, "dinov2", fixture_path("dinov2", "config.json"))
    return out


def _engine(dino_dir, method):
    config = make({"model.family": "dinov2", "model.pretrained": dino_dir, "model.peft": method, "image_size": 28,
                   "compute_dtype": "float32", "optim.lr": 1e-2, "optim.schedule": "constant"})
    return engine.build(config, num_classes=3, channels=3, task="multiclass", total_steps=10)


def _train(e, steps=3):
    before = jax.device_get(e.state.params)
    state = e.state
    for i in range(steps):
        state, out = e.train_step(state, _batch(i))
        assert bool(out["finite"])
    return before, jax.device_get(state.params), state.opt_state


def _changed(before, after):
    a, b = flatten(before), flatten(after)
    return {k for k in a if not np.array_equal(np.asarray(a[k]), np.asarray(b[k]))}


def test_lora_targets_qkv_and_mlp_kernels():
    config = ViTConfig("dinov2", 48, 2, 3, 14, (4, 4), 64, ffn="swiglu")
    shapes = models.param_shapes(config)
    pattern = peft.backbone_patterns(models.family("dinov2").lora_targets(config))
    found = peft.lora_targets({"backbone": shapes, "head": {"kernel": np.zeros((48, 3))}}, pattern)
    assert found == [f"backbone/blocks_{i}/{m}/kernel" for i in range(2) for m in ("attn/qkv", "mlp/w12", "mlp/w3")]


def test_lora_with_zero_b_is_the_base_model_and_merges_w_plus_scaled_ab(classifier_and_params):
    model, params = classifier_and_params
    pattern = peft.backbone_patterns(models.family("dinov2").lora_targets(model.backbone))
    lmodel, lparams = peft.add_lora(model, params, jax.random.PRNGKey(1), pattern)
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


def test_lora_trains_only_adapters_and_head(dino_dir):
    e = _engine(dino_dir, "lora")
    lparams, trainable = jax.device_get(e.state.params), e.trainable
    _, after, opt_state = _train(e)
    changed = _changed(lparams, after)
    expected = {k for k in flatten(lparams) if not k.startswith("backbone/")}
    assert changed == expected  # every adapter and the head moved ...
    assert not any(k.startswith("backbone/") for k in changed)  # ... and every base weight is bit-identical
    # B starts at zero (only B moves in the first step, A from the second on); optimizer state only for trained leaves
    assert all(np.any(v != 0) for k, v in flatten(after["lora"]).items() if k.endswith("lora_b"))
    moments = sum(np.size(x) for x in jax.tree_util.tree_leaves(opt_state) if np.ndim(x) > 0)
    assert moments == 2 * peft.count_trainable(lparams, trainable)
    assert peft.count_trainable(lparams, trainable) < 0.8 * sum(np.size(v) for v in flatten(lparams).values())


def test_bitfit_trains_only_biases_and_head(dino_dir):
    e = _engine(dino_dir, "bitfit")
    params, after, _ = _train(e)
    changed = _changed(params, after)
    biases = {k for k in flatten(params) if k.startswith("backbone/") and k.endswith("/bias")}
    assert any("norm" in k for k in biases) and any("qkv" in k for k in biases)
    assert changed == biases | {"head/kernel", "head/bias"}
    norm_biases = peft.norm_biases(params)  # structural: a bias beside a scale
    assert norm_biases == {k for k in biases if "norm" in k} and "backbone/blocks_0/mlp/fc1/bias" not in norm_biases


# ------------------------------------------------------------------------------------------------ through the trainer

PEFT = ["--dataset", "chexpert", "--image-size", "28", "--epochs", "2", "--batch-size", "8", "--fake-data", "64",
        "--lr", "1e-3"]


def _protocol(dino_dir, root, workdir, method, *extra, env=None):
    cmd = [sys.executable, "-m", "medjax.protocols", "peft", "--params", dino_dir, "--root", str(root),
           "--workdir", str(workdir), "--method", method, *PEFT, *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)


def _checkpoint_state(workdir):
    import orbax.checkpoint as ocp

    ckpt = os.path.join(workdir, "checkpoints")
    step = max(int(d) for d in os.listdir(ckpt) if d.isdigit())
    with ocp.StandardCheckpointer() as c:
        return step, c.restore(os.path.join(ckpt, str(step), "state"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_peft_through_the_trainer_keeps_base_weights_and_writes_metrics(tmp_path, dino_dir, method):
    proc = _protocol(dino_dir, tmp_path / "data", tmp_path / "run", method)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["method"] == method and "test_target" in result
    metrics = json.load(open(tmp_path / "run" / f"peft_{method}" / "metrics.json"))
    assert metrics["test"] == result["test"] and metrics["best_step"] is not None
    _, state = _checkpoint_state(tmp_path / "run" / f"peft_{method}")
    base = flatten(models.load_pretrained(dino_dir)[1]["params"])
    base["patch_embed/kernel"] = base["patch_embed/kernel"][:, :, 0:1]  # grayscale data: the red filter (the default)
    trained = flatten(state["params"]["backbone"])
    for path, value in base.items():
        if method == "lora" or not path.endswith("/bias"):
            assert np.array_equal(np.asarray(trained[path]), value), f"base weight {path} moved"
    assert any(not np.array_equal(np.asarray(trained[p]), base[p]) for p in base if p.endswith("/bias")) \
        == (method == "bitfit")


@pytest.mark.slow
def test_killed_lora_run_resumes_bitwise(tmp_path, dino_dir):
    import pickle

    from medjax.data import fake
    from medjax.protocols.__main__ import parser, peft_config

    args = parser().parse_args(["peft", "--params", dino_dir, "--root", str(tmp_path / "data"), "--workdir", "x",
                                "--method", "lora", *PEFT])
    fake.write("chexpert", str(tmp_path / "data"), 64, seed=0)
    script = ("import sys, pickle; from medjax import train;"
              "c = pickle.load(open(sys.argv[1], 'rb')); train.Trainer(c, sys.argv[2]).run()")
    runs = {}
    for name, kill in (("a", 0), ("b", 5)):
        config = peft_config(args)
        config.checkpoint_every, config.eval_every, config.debug_sigkill_at_step = 3, 100, kill
        config.progress_bar = False
        with open(tmp_path / f"{name}.pkl", "wb") as f:
            pickle.dump(config, f)
        cmd = [sys.executable, "-c", script, str(tmp_path / f"{name}.pkl"), str(tmp_path / name)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if kill:
            assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
            config.debug_sigkill_at_step = 0
            with open(tmp_path / f"{name}.pkl", "wb") as f:
                pickle.dump(config, f)
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            assert "at step 3" in proc.stdout
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[name] = _checkpoint_state(tmp_path / name)
    (step_a, a), (step_b, b) = runs["a"], runs["b"]
    assert step_a == step_b
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))
    a_test, b_test = (json.load(open(tmp_path / run / "metrics.json"))["test"] for run in ("a", "b"))
    assert a_test == b_test
