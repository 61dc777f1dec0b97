"""Performance machinery (issue 8): FSDP memory per device, one compilation for many steps, remat and scan give the
plain model's loss and gradients, the stacked <-> unrolled parameter layouts, input prefetch, the bf16 CPU matmul."""

import dataclasses
import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import classifier, engine, pretrained, sharding
from medjax.models import layers
from medjax.models.vit import ViTConfig, stack_blocks, unstack_blocks
from medjax.schema import make
from medjax.testing import ROOT

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # benchmarks/ is not an installed package
from benchmarks._common import count_compiles  # noqa: E402

TINY = ViTConfig(family="dinov2", width=32, depth=2, num_heads=2, patch_size=8, pos_grid=(2, 2), mlp_hidden=64,
                 layerscale=True)
# the whole model trains with a constant lr 1e-3, AdamW weight decay 0.05 (ndim > 1), clipping 1.0, float32 compute
TINY_RUN = {"model.family": "dinov2", "model.architecture": TINY.to_dict(), "model.freeze": "full",
            "compute_dtype": "float32", "image_size": 16, "optim.lr": 1e-3, "optim.weight_decay": 0.05,
            "optim.schedule": "constant"}


def build_tiny(overrides=None):
    return engine.build(make(TINY_RUN | (overrides or {})), num_classes=3, channels=3, task="multiclass",
                        total_steps=10)

# --------------------------------------------------------------------------------------------- FSDP memory

FSDP_WORKER = r"""
import json, jax, numpy as np
from medjax.schema import make
from medjax import engine, models, sharding
arch = {"family": "dinov2", "width": 256, "depth": 2, "num_heads": 4, "patch_size": 8, "pos_grid": [4, 4],
        "mlp_hidden": 1024, "layerscale": True}
config = make({"model.family": "dinov2", "model.architecture": arch, "model.freeze": "full",
               "compute_dtype": "float32", "image_size": 32, "optim.lr": 1e-3, "optim.weight_decay": 0.05,
               "optim.schedule": "constant", "mesh.data": 1, "mesh.fsdp": 8})
e = engine.build(config, num_classes=5, channels=3, task="multiclass", total_steps=4)
state, step, mesh = e.state, e.train_step, e.mesh
n_params = models.count_params(state.params)
dev0 = jax.devices()[0]

def bytes_on_dev0(tree):
    return sum(s.data.nbytes for leaf in jax.tree_util.tree_leaves(tree) for s in leaf.addressable_shards
               if s.device == dev0)

full = sum(x.nbytes for x in jax.tree_util.tree_leaves((state.params, state.opt_state)))  # the global arrays
before = bytes_on_dev0((state.params, state.opt_state))
rng = np.random.default_rng(0)
batch = sharding.global_batch({"image": rng.standard_normal((16, 32, 32, 3)).astype(np.float32),
                               "label": rng.integers(0, 5, 16).astype(np.int32)}, mesh)
compiled = step.lower(state, batch).compile()
state, out = step(state, batch)
mem = compiled.memory_analysis()
print(json.dumps({"single_device_bytes": full, "fsdp_device0_bytes": before,
                  "fsdp_device0_bytes_after_step": bytes_on_dev0((state.params, state.opt_state)),
                  "params": n_params, "devices": jax.device_count(),
                  "xla_argument_bytes": mem.argument_size_in_bytes if mem else None,
                  "loss": float(out["loss"])}))
"""


def test_fsdp_keeps_an_eighth_of_parameter_and_optimizer_memory_per_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", FSDP_WORKER], env=env, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8 and np.isfinite(out["loss"])
    ratio = out["fsdp_device0_bytes"] / out["single_device_bytes"]
    # 1/8 plus what stays replicated (norms, biases, the head, tensors under the 2**14-element threshold)
    assert 1 / 8 <= ratio < 1 / 8 * 1.1, out
    assert out["fsdp_device0_bytes_after_step"] == out["fsdp_device0_bytes"]  # the step keeps the state sharded


# --------------------------------------------------------------------------------------------- compilation


@pytest.fixture(scope="module")
def tiny():
    """(model, params, batches) of a 2-block classifier on 16 px images: the classifier `engine.build` makes of
    TINY_RUN and its initial parameters (numpy)."""
    model, variables = classifier.build_classifier(make(TINY_RUN).model, 3, 3, 16, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    batches = [{"image": rng.standard_normal((4, 16, 16, 3)).astype(np.float32),
                "label": rng.integers(0, 3, 4).astype(np.int32)} for _ in range(4)]
    return model, variables["params"], batches


def test_train_step_compiles_once(caplog, tiny):
    batches = tiny[2]
    e = build_tiny()
    state, step = e.state, e.train_step
    first_params = jax.tree_util.tree_leaves(state.params)
    with count_compiles() as compiles, caplog.at_level(logging.WARNING), jax.log_compiles():
        losses = []
        for batch in sharding.prefetch_to_device(batches, e.mesh, size=2):
            state, out = step(state, batch)
            losses.append(float(out["loss"]))
    assert len(compiles) == 1, f"{len(compiles)} XLA compilations for {len(batches)} steps"
    assert sum("train_step" in r.getMessage() and "Compiling" in r.getMessage() for r in caplog.records) == 1
    assert step._cache_size() == 1
    assert all(x.is_deleted() for x in first_params)  # the state's buffers were donated to the step
    assert int(state.step) == len(batches) and len(set(losses)) == len(losses)


# --------------------------------------------------------------------------------------------- remat / scan


def _loss_and_grads(config, params, batch):
    model = classifier.Classifier(config, 3)

    def loss(p):
        return engine.loss_fn(model.apply({"params": p}, batch["image"]), batch["label"], "multiclass")

    with jax.default_matmul_precision("float32"):
        return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope="module")
def plain_loss_and_grads(tiny):
    return _loss_and_grads(TINY, tiny[1], tiny[2][0])


@pytest.mark.parametrize("options", [{"remat": True}, {"scan": True}, {"scan": True, "remat": True}])
def test_remat_and_scan_give_the_plain_loss_and_gradients(options, tiny, plain_loss_and_grads):
    params, batch = tiny[1], tiny[2][0]
    loss, grads = plain_loss_and_grads
    config = dataclasses.replace(TINY, **options)
    stacked = stack_blocks(params) if config.scan else params
    shapes = jax.tree_util.tree_map(np.shape, classifier.Classifier(config, 3).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"])
    assert jax.tree_util.tree_map(np.shape, stacked) == shapes
    loss2, grads2 = _loss_and_grads(config, stacked, batch)
    if config.scan:
        grads2 = unstack_blocks(grads2)
    assert abs(float(loss2) - float(loss)) <= 1e-5
    flat, flat2 = pretrained.flatten(jax.device_get(grads)), pretrained.flatten(jax.device_get(grads2))
    assert flat.keys() == flat2.keys()
    for k in flat:
        np.testing.assert_allclose(flat2[k], flat[k], atol=1e-5, rtol=0, err_msg=k)
    assert max(np.abs(v).max() for v in flat.values()) > 1e-2  # the gradients are not trivially small


def test_stack_and_unstack_blocks_round_trip(tiny):
    params = tiny[1]
    backbone = params["backbone"]
    stacked = stack_blocks(backbone)
    assert "blocks" in stacked and not any(k.startswith("blocks_") for k in stacked)
    assert stacked["blocks"]["attn"]["qkv"]["kernel"].shape == (2, 32, 96)
    assert isinstance(stacked["blocks"]["norm1"]["scale"], np.ndarray)  # numpy stays numpy
    back = unstack_blocks(stacked)
    assert pretrained.flatten(back).keys() == pretrained.flatten(backbone).keys()
    for k, v in pretrained.flatten(backbone).items():
        assert np.array_equal(pretrained.flatten(back)[k], v), k
    whole = stack_blocks(params)  # a classifier's parameters: the backbone is converted, the head left alone
    assert "blocks" in whole["backbone"] and whole["head"] is params["head"]
    assert pretrained.flatten(unstack_blocks(whole)).keys() == pretrained.flatten(params).keys()
    with pytest.raises(ValueError, match="already stacked"):
        stack_blocks(stacked)
    with pytest.raises(ValueError, match="without gaps"):
        stack_blocks({k: v for k, v in backbone.items() if k != "blocks_0"})


def test_scan_loads_a_converted_checkpoint(tmp_path, tiny):
    """model.scan=True takes a converted (unrolled) backbone and gives the same logits as the default layout."""
    model, params, batches = tiny
    pretrained.save(str(tmp_path / "bb"), {"params": params["backbone"]},
                    {"family": "dinov2", "architecture": TINY.to_dict()})
    base = {"model.family": "dinov2", "model.pretrained": str(tmp_path / "bb"), "model.architecture": None}
    scanned, variables = classifier.build_classifier(make(base | {"model.scan": True, "model.remat": True}).model,
                                                     3, 3, 16, jax.random.PRNGKey(0))
    p = variables["params"]
    assert "blocks" in p["backbone"] and scanned.backbone.scan and scanned.backbone.remat
    p["head"] = params["head"]
    with jax.default_matmul_precision("float32"):
        got = np.asarray(scanned.apply({"params": p}, batches[0]["image"]))
        want = np.asarray(model.apply({"params": params}, batches[0]["image"]))
    np.testing.assert_allclose(got, want, atol=1e-5)
    # per-block rules need the numbered blocks: the build stops when it expands them
    with pytest.raises(ValueError, match=r"model\.scan.*partial"):
        build_tiny(base | {"model.scan": True, "model.freeze": "partial"})
    with pytest.raises(ValueError, match=r"model\.scan"):
        build_tiny(base | {"model.scan": True, "optim.layer_decay": 0.75})


# --------------------------------------------------------------------------------------------- input, kernels


def test_prefetch_to_device_keeps_order_and_reads_only_its_window():
    mesh = sharding.make_mesh(-1, 1)
    reads = []

    def host():
        for i in range(6):
            reads.append(i)
            yield {"x": np.full((2, 3), i, np.float32)}

    it = sharding.prefetch_to_device(host(), mesh, size=2)
    first = next(it)
    assert reads == [0, 1, 2] and isinstance(first["x"], jax.Array)
    got = [int(first["x"][0, 0])] + [int(b["x"][0, 0]) for b in it]
    assert got == list(range(6))
    assert [int(b["x"][0, 0]) for b in sharding.prefetch_to_device(host(), mesh, size=0)] == list(range(6))


def test_head_major_attention_is_dot_product_attention():
    q, k, v = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2, 5, 4, 8)), jnp.float32)
    ref = jax.nn.dot_product_attention(q, k, v)
    to_heads = lambda t: jnp.transpose(t, (0, 2, 1, 3))  # noqa: E731
    out = jnp.transpose(layers.head_major_attention(to_heads(q), to_heads(k), to_heads(v)), (0, 2, 1, 3))
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_cpu_bf16_matmul_equals_the_plain_bf16_one(monkeypatch):
    """bfloat16 compute on CPU accumulates in float32 (a native bf16 GEMM); values and gradients equal the plain
    bf16 path's, which XLA:CPU also accumulates in float32."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 10, 32)), jnp.bfloat16)
    mlp = layers.Mlp(64, True, jnp.bfloat16)
    p = mlp.init(jax.random.PRNGKey(0), x)
    loss = jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(mlp.apply(p, x).astype(jnp.float32) ** 2), argnums=(0, 1)))
    assert layers.cpu_bf16(jnp.bfloat16) and not layers.cpu_bf16(jnp.float32)
    fast = loss(p, x)
    monkeypatch.setattr(layers, "cpu_bf16", lambda dtype: False)
    plain = jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(mlp.apply(p, x).astype(jnp.float32) ** 2),
                                       argnums=(0, 1)))(p, x)
    for a, b in zip(jax.tree_util.tree_leaves(fast), jax.tree_util.tree_leaves(plain)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


# --------------------------------------------------------------------------------------------- the benchmark


def test_train_step_benchmark_reports_both_frameworks_and_their_ratio():
    """The README's benchmark command, shrunk: a DINOv2-S/14 at 28 px, one timed step per framework."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"), "--model",
                           "dinov2_vits14", "--image-size", "28", "--batch-size", "2", "--steps", "1", "--warmup", "1",
                           "--threads", "1"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    rate = {f: float(next(ln for ln in lines if ln.startswith(f"{f} images/s: ")).split(": ")[1])
            for f in ("medjax", "pytorch")}
    ratio = float(lines[-1].removeprefix("ratio: "))
    assert lines[-1].startswith("ratio: ") and all(v > 0 for v in rate.values())
    assert ratio == pytest.approx(rate["medjax"] / rate["pytorch"], rel=2e-3)  # one round: the ratio of the rates
    assert "0 compilation(s) during the steps" in proc.stdout


def test_attention_falls_back_to_xla_where_cudnn_refuses(monkeypatch, caplog):
    """Where the cuDNN path is chosen but cuDNN cannot run (here: on CPU), the block runs XLA's attention, equal to
    the default path, and says why once."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 32)), jnp.float32)
    attn = layers.Attention(num_heads=2, qkv_bias=True, proj_bias=True)
    p = attn.init(jax.random.PRNGKey(0), x)
    want = attn.apply(p, x)
    monkeypatch.setattr(layers, "use_cudnn_attention", lambda dtype, head_dim: True)
    with caplog.at_level(logging.WARNING):
        got = attn.apply(p, x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert any("cuDNN attention unavailable" in r.getMessage() for r in caplog.records)
