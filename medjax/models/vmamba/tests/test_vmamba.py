"""VMamba: the parallel selective scan against a sequential reference, parity with the official PyTorch VSSM through
the CLIs, gradients through the scan, the released variants' parameter counts, and loud failures."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from medjax import models
from medjax.convert import CheckpointError, ConversionError, convert
from medjax.models import VARIANTS, vmamba
from medjax.models.vmamba.convert import vssm_config
from medjax.models.vmamba.tests.vmamba_reference import selective_scan_ref
from medjax.testing import (
    assert_fixture_outputs,
    conversion_error,
    convert_and_embed,
    fixture_path,
    max_abs,
    without_keys,
)

CKPT, CFG = fixture_path("vmamba", "checkpoint.pth"), fixture_path("vmamba", "config.json")
TOL = 1e-4  # the bar; measured: pooled_feature 1.2e-6, last_stage_feature_map 7.2e-6


def _to_seq_first(u, delta, A, B, C, D, bias, k_dirs):
    """Upstream selective_scan_fn layouts -> medjax's sequence-first ones."""
    batch, kd, length = u.shape
    d = kd // k_dirs
    def seq(t):
        return jnp.asarray(t.reshape(batch, k_dirs, -1, length).transpose(3, 0, 1, 2))
    def seq_bc(t):
        return jnp.asarray(t.transpose(3, 0, 1, 2))
    return (seq(u), seq(delta), jnp.asarray(A.reshape(k_dirs, d, -1)), seq_bc(B), seq_bc(C),
            jnp.asarray(D.reshape(k_dirs, d)), jnp.asarray(bias.reshape(k_dirs, d)))


@pytest.mark.parametrize("length,n_state,chunk", [(150, 1, 64), (150, 1, None), (149, 3, 16), (49, 2, 7)])
def test_parallel_scan_matches_sequential_reference(length, n_state, chunk):
    """Chunked associative scan (including a prime length that needs padding) == a step-by-step float64 loop."""
    rng = np.random.default_rng(length + n_state)
    batch, k_dirs, d = 2, 4, 6
    u = rng.normal(size=(batch, k_dirs * d, length)).astype(np.float32)
    delta = rng.normal(size=(batch, k_dirs * d, length)).astype(np.float32)
    A = -np.exp(rng.normal(0, 0.5, size=(k_dirs * d, n_state))).astype(np.float32)
    B = rng.normal(size=(batch, k_dirs, n_state, length)).astype(np.float32)
    C = rng.normal(size=(batch, k_dirs, n_state, length)).astype(np.float32)
    D = rng.normal(size=(k_dirs * d,)).astype(np.float32)
    bias = rng.normal(0, 0.5, size=(k_dirs * d,)).astype(np.float32)
    expected = selective_scan_ref(u, delta, A, B, C, D, bias)
    got = jax.jit(vmamba.selective_scan, static_argnums=7)(*_to_seq_first(u, delta, A, B, C, D, bias, k_dirs), chunk)
    got = np.asarray(got).transpose(1, 2, 3, 0).reshape(expected.shape)
    assert np.abs(got - expected).max() / np.abs(expected).max() <= 1e-5


def test_cross_scan_orders_and_merge_on_a_non_square_map():
    x = np.random.default_rng(0).normal(size=(2, 3, 5, 4)).astype(np.float32)  # (B, H, W, D), H != W
    xs = np.asarray(vmamba.cross_scan(jnp.asarray(x)))
    for h in range(3):
        for w in range(5):
            np.testing.assert_array_equal(xs[h * 5 + w, :, 0], x[:, h, w])  # row-major
            np.testing.assert_array_equal(xs[w * 3 + h, :, 1], x[:, h, w])  # column-major
    np.testing.assert_array_equal(xs[:, :, 2:], xs[::-1, :, :2])  # reversed
    np.testing.assert_allclose(np.asarray(vmamba.cross_merge(jnp.asarray(xs), 3, 5)), 4 * x, rtol=1e-6)


def test_fixture_parity_through_clis(tmp_path):
    got, expected, stdout = convert_and_embed(tmp_path, "vmamba", CKPT, "vmamba", CFG)
    # the fixture holds 458,138 parameters including classifier.head (128 -> 10), which is ignored on purpose
    assert json.loads(stdout)["num_params"] == 458_138 - (128 * 10 + 10)
    assert_fixture_outputs(got, expected, "vmamba", tol=TOL)
    assert max_abs(got["linear_head_input"], got["pooled_feature"]) == 0
    assert got["attention_head_input"].shape == (2, 9, 128)
    assert max_abs(got["attention_head_input"].mean(axis=1), got["pooled_feature"]) <= 1e-6


# ------------------------------------------------------------------------------------------------ gradients

def _sequential_selective_scan(u, delta, A, B, C, D, bias):
    """The same maths with a step-by-step lax.scan and JAX's own autodiff (no custom VJP, no associative scan)."""
    delta = vmamba.softplus(delta + bias)
    a, b = jnp.exp(delta[..., None] * A), (delta * u)[..., None] * B[..., None, :]

    def step(h, ab):
        h = ab[0] * h + ab[1]
        return h, h

    _, h = jax.lax.scan(step, jnp.zeros(a.shape[1:], a.dtype), (a, b))
    return (h * C[..., None, :]).sum(-1) + u * D


@pytest.mark.parametrize("chunk", [None, 5])
def test_selective_scan_custom_vjp_equals_autodiff(chunk):
    """The hand-written backward (the recurrence run in reverse + fused terms) == autodiff of a sequential scan, for
    all seven inputs, in float64; one delta sits above softplus's threshold of 20."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        L, b, K, D, N = 37, 2, 4, 5, 3
        u, delta = rng.normal(size=(L, b, K, D)), rng.normal(size=(L, b, K, D))
        delta[3, 1, 2, 4] = 25.0
        args = [jnp.asarray(t) for t in (u, delta, -np.exp(rng.normal(0, 0.5, size=(K, D, N))),
                                         rng.normal(size=(L, b, K, N)), rng.normal(size=(L, b, K, N)),
                                         rng.normal(size=(K, D)), rng.normal(0, 0.5, size=(K, D)))]
        w = jnp.asarray(rng.normal(size=(L, b, K, D)))
        def grad(f):
            return jax.jit(jax.grad(lambda *a: (w * f(*a) ** 2).sum(), argnums=tuple(range(7))))
        ours = grad(lambda *a: vmamba.selective_scan(*a, chunk=chunk))(*args)
        ref = grad(_sequential_selective_scan)(*args)
        for name, x, y in zip(("u", "delta", "A", "B", "C", "D", "delta_bias"), ours, ref):
            assert float(jnp.abs(x - y).max() / jnp.abs(y).max()) <= 1e-12, name


def test_model_gradients_match_finite_differences():
    """Directional derivatives of a tiny one-stage VMamba (patch embed, one VSS block with d_state 2 and a 4-chunk
    scan, final norm) in float64: autodiff == central differences, for all parameters and for the input image."""
    config = vmamba.VMambaConfig(dims=(8,), depths=(1,), d_state=2, img_size=16, scan_chunk=4)
    model = vmamba.VMamba(config)
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        x = jnp.asarray(rng.normal(size=(2, 16, 16, 3)))
        params = jax.jit(model.init)(jax.random.key(0), x.astype(jnp.float32))["params"]
        params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64) + 0.1 * rng.normal(size=p.shape), params)
        w1, w2 = rng.normal(size=(2, 8)), rng.normal(size=(2, 8, 4, 4))

        def loss(p, x):
            out = model.apply({"params": p}, x)
            return (w1 * out["pooled_feature"]).sum() + (w2 * out["last_stage_feature_map"]).sum()

        f = jax.jit(loss)
        gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
        vp = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
        vx = jnp.asarray(rng.normal(size=x.shape))
        eps = 1e-6
        for name, v, g, shift in [
            ("params", vp, gp, lambda s: (jax.tree_util.tree_map(lambda p, d: p + s * d, params, vp), x)),
            ("input", vx, gx, lambda s: (params, x + s * vx)),
        ]:
            fd = (f(*shift(eps)) - f(*shift(-eps))) / (2 * eps)
            ad = sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(v)))
            assert abs(float(fd - ad)) <= 1e-6 * abs(float(ad)), (name, float(fd), float(ad))
        # every SSM parameter receives gradient
        op = gp["layers_0"]["blocks_0"]["op"]
        for key in ("A_logs", "Ds", "dt_projs_bias", "dt_projs_weight", "x_proj_weight"):
            assert float(jnp.abs(op[key]).max()) > 0, key


def test_scan_memory_at_224px_is_bounded():
    """Forward + backward of the largest scan at 224 px (stage 1: L = 56*56, K = 4, d_inner = 192, batch 1) needs
    about 6 arrays of the input's size: the custom VJP keeps the inputs and h, and chunks bound the associative scan's
    tree. (Measured: 6.1x with chunks of 64; autodiff through the same scan needs 13.7x, one unchunked scan 10.9x.)"""
    S = jax.ShapeDtypeStruct
    u, bc = S((3136, 1, 4, 192), jnp.float32), S((3136, 1, 4, 1), jnp.float32)
    A, kd = S((4, 192, 1), jnp.float32), S((4, 192), jnp.float32)
    grad = jax.jit(jax.grad(lambda *a: vmamba.selective_scan(*a, chunk=64).sum(), argnums=tuple(range(7))))
    temp = grad.lower(u, u, A, bc, bc, kd, kd).compile().memory_analysis().temp_size_in_bytes
    assert temp <= 7 * 3136 * 4 * 192 * 4, temp / (3136 * 4 * 192 * 4)


# ------------------------------------------------------------------------------------------------ variants

def _upstream_count(dims, depths, d_state=1, ssm_ratio=2.0, mlp_ratio=4.0, num_classes=1000):
    """Parameters of upstream's VSSM (v05_noz, patch embed v2, downsample v3, ssm_conv 3 without bias), from its
    state-dict shapes (ARCHITECTURE.md), classifier head included, as upstream's model table counts them."""
    e = dims[0]
    total = (3 * (e // 2) * 9 + e // 2) + 2 * (e // 2) + ((e // 2) * e * 9 + e) + 2 * e  # patch_embed.{0,2,5,7}
    for i, (c, depth) in enumerate(zip(dims, depths)):
        d, r, hidden = int(ssm_ratio * c), -(-c // 16), int(mlp_ratio * c)
        ss2d = d * c + d * 9 + 4 * (r + 2 * d_state) * d + 4 * d * r + 4 * d + 4 * d * d_state + 4 * d + 2 * d + c * d
        total += depth * (2 * c + ss2d + 2 * c + (hidden * c + hidden) + (c * hidden + c))
        if i < len(dims) - 1:
            total += dims[i + 1] * c * 9 + dims[i + 1] + 2 * dims[i + 1]  # downsample.{1,3}
    return total + 2 * dims[-1] + dims[-1] * num_classes + num_classes  # classifier.{norm,head}


@pytest.mark.parametrize("name,millions", [("vmamba_small", 50.15), ("vmamba_base", 88.56)])
def test_variant_parameter_counts_match_upstream(name, millions):
    family, kwargs = VARIANTS[name]
    config = vssm_config(kwargs)
    assert (family, config.dims, config.depths) == ("vmamba", tuple(kwargs["dims"] * 2 ** i for i in range(4)),
                                                     (2, 2, 15, 2))
    backbone = models.count_params(models.param_shapes(config))
    head = config.dims[-1] * 1000 + 1000  # classifier.head, not part of the backbone
    assert backbone + head == _upstream_count(config.dims, config.depths)
    assert round((backbone + head) / 1e6, 2) == millions


def test_tiny_fixture_count_formula():
    cfg = json.load(open(CFG))
    assert _upstream_count([16, 32, 64, 128], cfg["depths"], num_classes=cfg["num_classes"]) == 458_138


# ------------------------------------------------------------------------------------------------ bad inputs

def test_missing_A_logs_is_named(tmp_path):
    bad = without_keys(CKPT, tmp_path / "bad.pth", "model/layers.2.blocks.1.op.A_logs")
    error = conversion_error(bad, str(tmp_path / "out"), "vmamba", CFG)
    assert error.missing == ["layers.2.blocks.1.op.A_logs (for layers_2/blocks_1/op/A_logs)"]
    assert "classifier.head" in str(error)  # the documented ignorable keys are quoted
    assert not (tmp_path / "out").exists()


def test_misshaped_x_proj_weight_is_a_shape_error(tmp_path):
    ckpt = torch.load(CKPT, weights_only=True)
    ckpt["model"]["layers.0.blocks.0.op.x_proj_weight"] = ckpt["model"]["layers.0.blocks.0.op.x_proj_weight"][:, :2]
    torch.save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(ConversionError) as info:
        convert(str(tmp_path / "bad.pth"), str(tmp_path / "out"), "vmamba", CFG)
    assert any("layers.0.blocks.0.op.x_proj_weight" in m and "(4, 2, 32)" in m for m in info.value.mismatched)


@pytest.mark.parametrize("change,named", [
    ({"forward_type": "v05"}, "forward_type='v05'"),
    ({"forward_type": "v2"}, "forward_type='v2'"),
    ({"downsample_version": "v1"}, "downsample_version='v1'"),
    ({"patchembed_version": "v1"}, "patchembed_version='v1'"),
    ({"norm_layer": "bn"}, "norm_layer='bn'"),
    ({"gmlp": True}, "gmlp=True"),
    ({"ssm_d_stat": 1}, "ssm_d_stat"),
])
def test_unsupported_config_is_refused_by_name(tmp_path, change, named):
    cfg = {**json.load(open(CFG)), **change}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as info:
        convert(CKPT, str(tmp_path / "out"), "vmamba", str(tmp_path / "cfg.json"))
    assert named in str(info.value)


def test_channels_last_norm_layer_is_the_same_network():
    """norm_layer 'ln' (upstream's config.py default) builds the same parameters and math as 'ln2d'."""
    cfg = json.load(open(CFG))
    assert vssm_config({**cfg, "norm_layer": "ln"}) == vssm_config(cfg)


def test_ema_weights_are_taken_with_ema(tmp_path):

    ckpt = torch.load(CKPT, weights_only=True)
    ema = {k: v + 1.0 for k, v in ckpt["model"].items()}
    torch.save({"model": ckpt["model"], "model_ema": ema, "epoch": 3}, tmp_path / "both.pth")
    convert(str(tmp_path / "both.pth"), str(tmp_path / "ema"), "vmamba", CFG, ema=True)
    _, params_vars, _ = models.load_pretrained(str(tmp_path / "ema"))
    params = params_vars["params"]
    expected = ema["layers.1.blocks.0.op.A_logs"].numpy()
    assert max_abs(params["layers_1"]["blocks_0"]["op"]["A_logs"], expected) == 0
    with pytest.raises(CheckpointError, match="model_ema"):
        convert(CKPT, str(tmp_path / "no_ema"), "vmamba", CFG, ema=True)
