"""Parity against transformers' PyTorch models built from small random configs with perturbed weights, saved with
`save_pretrained` and converted from those files."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from medjax import models
from medjax.convert import convert
from medjax.testing import PARITY_TOL, max_abs, perturb_

transformers = pytest.importorskip("transformers")


def _save(model, path):
    model.eval()
    model.save_pretrained(path)
    return str(path)


def _medjax(params_dir, images):
    config, params_vars, _ = models.load_pretrained(params_dir)
    params = params_vars["params"]
    with jax.default_matmul_precision("float32"):
        out = models.build_backbone(config).apply({"params": params}, jnp.asarray(images.transpose(0, 2, 3, 1)))
    return {k: np.asarray(v) for k, v in out.items()}


def _images(batch, height, width, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 3, height, width)).astype(np.float32)


def _dinov2_reference(model, images):
    with torch.no_grad():
        out = model(torch.from_numpy(images), output_hidden_states=True)
    return out.last_hidden_state.numpy(), out.hidden_states[-1].numpy()


DINOV2_CASES = {
    # name: (model class, config kwargs, input H, W)
    "mlp_resized": ("Dinov2Model", dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, patch_size=14,
                                        image_size=98), 56, 70),
    "swiglu": ("Dinov2Model", dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, patch_size=14,
                                   image_size=70, use_swiglu_ffn=True), 84, 84),
    "registers": ("Dinov2WithRegistersModel", dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                                   patch_size=14, image_size=98, num_register_tokens=4), 42, 56),
    "registers_same_grid": ("Dinov2WithRegistersModel", dict(hidden_size=32, num_hidden_layers=1,
                                                             num_attention_heads=2, patch_size=14, image_size=56,
                                                             num_register_tokens=4), 56, 56),
}


@pytest.mark.parametrize("case", sorted(DINOV2_CASES))
def test_dinov2_transformers(tmp_path, case):
    cls, kwargs, h, w = DINOV2_CASES[case]
    model_cls = getattr(transformers, cls)
    config_cls = getattr(transformers, cls.replace("Model", "Config"))
    torch.manual_seed(0)
    model = perturb_(model_cls(config_cls(**kwargs)), seed=1)
    convert(_save(model, tmp_path / "hf"), str(tmp_path / "jx"), "dinov2")
    images = _images(2, h, w)
    x_norm, x_prenorm = _dinov2_reference(model, images)
    got = _medjax(str(tmp_path / "jx"), images)
    r = kwargs.get("num_register_tokens", 0)
    pairs = {"x_norm_clstoken": x_norm[:, 0], "x_norm_regtokens": x_norm[:, 1:1 + r],
             "x_norm_patchtokens": x_norm[:, 1 + r:], "x_prenorm": x_prenorm,
             "linear_head_input": x_norm[:, 0], "attention_head_input": x_prenorm[:, 1 + r:]}
    for key, ref in pairs.items():
        assert max_abs(got[key], ref) <= PARITY_TOL, key


def _official_dinov2_interpolation(self, embeddings, height, width):
    """facebookresearch/dinov2's resize for the non-register models (scale_factor with the 0.1 offset), patched into
    transformers' Dinov2Embeddings as SPEC section 3 describes."""
    pos = self.position_embeddings
    n = embeddings.shape[1] - 1
    m = int(round((pos.shape[1] - 1) ** 0.5))
    if n == m * m and height == width:
        return pos
    h0, w0 = height // self.patch_size, width // self.patch_size
    patch = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2).float()
    patch = torch.nn.functional.interpolate(patch, scale_factor=((h0 + 0.1) / m, (w0 + 0.1) / m), mode="bicubic",
                                            antialias=False)
    assert patch.shape[-2:] == (h0, w0)
    return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)], dim=1)


def test_dinov2_transformers_file_with_official_resize(tmp_path, monkeypatch):
    """`--dinov2-resize official` on a transformers file reproduces the official implementation's outputs."""
    torch.manual_seed(0)
    model = perturb_(transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=14, image_size=98)), seed=2)
    convert(_save(model, tmp_path / "hf"), str(tmp_path / "jx"), "dinov2", dinov2_resize="official")
    images = _images(2, 56, 56)
    default_x_norm, _ = _dinov2_reference(model, images)
    from transformers.models.dinov2 import modeling_dinov2

    monkeypatch.setattr(modeling_dinov2.Dinov2Embeddings, "interpolate_pos_encoding", _official_dinov2_interpolation)
    x_norm, _ = _dinov2_reference(model, images)
    got = _medjax(str(tmp_path / "jx"), images)
    assert max_abs(got["x_norm_patchtokens"], x_norm[:, 1:]) <= PARITY_TOL
    # The two implementations really differ here, so the test distinguishes them.
    assert max_abs(x_norm, default_x_norm) > 1e-3


def test_mae_transformers(tmp_path):
    torch.manual_seed(0)
    config = transformers.ViTMAEConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                       intermediate_size=96, patch_size=16, image_size=64, mask_ratio=0.0)
    model = perturb_(transformers.ViTMAEModel(config), seed=3)
    convert(_save(model, tmp_path / "hf"), str(tmp_path / "jx"), "mae")
    images = _images(3, 64, 64)
    # noise = arange keeps the token order (mask ratio 0 still shuffles by the noise's argsort).
    noise = torch.arange(16, dtype=torch.float32).expand(3, 16)
    with torch.no_grad():
        ref = model(torch.from_numpy(images), noise=noise).last_hidden_state.numpy()
    got = _medjax(str(tmp_path / "jx"), images)
    assert max_abs(got["x_norm"], ref) <= PARITY_TOL
    assert max_abs(got["linear_head_input"], ref[:, 1:].mean(1)) <= PARITY_TOL
    assert max_abs(got["attention_head_input"], ref[:, 1:]) <= PARITY_TOL


def test_deit_transformers_vit(tmp_path):
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=256, patch_size=16, image_size=64, layer_norm_eps=1e-6)
    model = perturb_(transformers.ViTModel(config), seed=4)  # with its pooler, which the converter ignores
    convert(_save(model, tmp_path / "hf"), str(tmp_path / "jx"), "deit")
    images = _images(2, 64, 64)
    with torch.no_grad():
        ref = model(torch.from_numpy(images)).last_hidden_state.numpy()
    got = _medjax(str(tmp_path / "jx"), images)
    assert max_abs(got["x_norm_clstoken"], ref[:, 0]) <= PARITY_TOL
    assert max_abs(got["debug_x_norm"], ref) <= PARITY_TOL


def _to_official_dinov2(hf_state: dict) -> dict:
    """Rename a transformers Dinov2(WithRegisters) state dict to the torch.hub layout (written independently of the
    converter's table, from the two upstream codebases)."""
    import re

    out = {}
    for k, v in hf_state.items():
        k = k.replace("embeddings.position_embeddings", "pos_embed").replace("embeddings.cls_token", "cls_token")
        k = k.replace("embeddings.register_tokens", "register_tokens").replace("embeddings.mask_token", "mask_token")
        k = k.replace("embeddings.patch_embeddings.projection", "patch_embed.proj")
        k = re.sub(r"^encoder\.layer\.", "blocks.", k).replace("attention.output.dense", "attn.proj")
        k = k.replace("layer_scale1.lambda1", "ls1.gamma").replace("layer_scale2.lambda1", "ls2.gamma")
        k = k.replace("mlp.weights_in", "mlp.w12").replace("mlp.weights_out", "mlp.w3")
        k = re.sub(r"^layernorm\.", "norm.", k)
        out[k] = v
    for i in {int(m.group(1)) for m in (re.match(r"blocks\.(\d+)\.", k) for k in out) if m}:
        for kind in ("weight", "bias"):
            parts = [out.pop(f"blocks.{i}.attention.attention.{n}.{kind}") for n in ("query", "key", "value")]
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts)
    return out


def test_dinov2_official_registers_swiglu(tmp_path):
    """The torch.hub `_reg4` layout with a fused SwiGLU (like dinov2_vitg14_reg4): antialiased size-based resize."""
    import json

    from safetensors.torch import load_file

    torch.manual_seed(0)
    config = transformers.Dinov2WithRegistersConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                                    patch_size=14, image_size=98, num_register_tokens=4,
                                                    use_swiglu_ffn=True)
    model = perturb_(transformers.Dinov2WithRegistersModel(config), seed=5)
    _save(model, tmp_path / "hf")
    torch.save(_to_official_dinov2(load_file(tmp_path / "hf" / "model.safetensors")), tmp_path / "reg4.pth")
    kwargs = {"img_size": 98, "patch_size": 14, "embed_dim": 48, "depth": 2, "num_heads": 3, "init_values": 1.0,
              "ffn_layer": "swiglufused", "num_register_tokens": 4, "interpolate_antialias": True,
              "interpolate_offset": 0.0, "block_chunks": 0}
    (tmp_path / "reg4.json").write_text(json.dumps(kwargs))
    convert(str(tmp_path / "reg4.pth"), str(tmp_path / "jx"), "dinov2", str(tmp_path / "reg4.json"))
    images = _images(2, 70, 42)
    x_norm, x_prenorm = _dinov2_reference(model, images)
    got = _medjax(str(tmp_path / "jx"), images)
    assert max_abs(got["x_norm_patchtokens"], x_norm[:, 5:]) <= PARITY_TOL
    assert max_abs(got["x_norm_regtokens"], x_norm[:, 1:5]) <= PARITY_TOL
    assert max_abs(got["x_prenorm"], x_prenorm) <= PARITY_TOL


@pytest.mark.slow
def test_full_size_dinov2_vitb14(tmp_path):
    """A full-size DINOv2 ViT-B/14 (86M parameters, random perturbed weights) converts and matches at 224 px."""
    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=14,
                                       image_size=518)
    model = perturb_(transformers.Dinov2Model(config), seed=6)
    meta = convert(_save(model, tmp_path / "hf"), str(tmp_path / "jx"), "dinov2")
    torch_params = sum(p.numel() for n, p in model.named_parameters() if "mask_token" not in n)
    assert meta["num_params"] == torch_params
    assert 86_000_000 < meta["num_params"] < 87_000_000
    images = _images(1, 224, 224)
    x_norm, x_prenorm = _dinov2_reference(model, images)
    got = _medjax(str(tmp_path / "jx"), images)
    assert max_abs(got["x_norm_clstoken"], x_norm[:, 0]) <= 1e-4
    assert max_abs(got["x_norm_patchtokens"], x_norm[:, 1:]) <= 1e-4
    assert max_abs(got["x_prenorm"], x_prenorm) <= 1e-4


def test_transformers_file_with_official_kwargs_keeps_transformers_resize(tmp_path):
    """An architecture given in upstream (torch.hub) kwargs does not change how a transformers file resizes."""
    import json

    torch.manual_seed(0)
    model = perturb_(transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=14, image_size=98)), seed=7)
    _save(model, tmp_path / "hf")
    kwargs = {"img_size": 98, "patch_size": 14, "embed_dim": 32, "depth": 1, "num_heads": 2, "init_values": 1.0}
    (tmp_path / "official.json").write_text(json.dumps(kwargs))
    convert(str(tmp_path / "hf" / "model.safetensors"), str(tmp_path / "jx"), "dinov2",
            str(tmp_path / "official.json"))
    images = _images(2, 56, 56)
    x_norm, _ = _dinov2_reference(model, images)
    assert max_abs(_medjax(str(tmp_path / "jx"), images)["x_norm_patchtokens"], x_norm[:, 1:]) <= PARITY_TOL


def test_cli_with_explicit_transformers_config(tmp_path):
    from medjax.testing import run_cli

    torch.manual_seed(0)
    config = transformers.ViTMAEConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, patch_size=16, image_size=32)
    hf = _save(perturb_(transformers.ViTMAEForPreTraining(config), seed=8), tmp_path / "hf")
    proc = run_cli("converters", f"{hf}/model.safetensors", str(tmp_path / "jx"), "--model", "mae",
                   "--config", f"{hf}/config.json")
    assert '"format": "mae_transformers"' in proc.stdout
    _, params_vars, meta = models.load_pretrained(str(tmp_path / "jx"))
    params = params_vars["params"]
    assert meta["source"]["config"] == "config.json" and params["pos_embed"].shape == (1, 5, 32)


@pytest.mark.parametrize("size", [56, 70])  # transformers' Aimv2 (non-native) supports square inputs only
def test_aimv2_transformers(tmp_path, size):
    torch.manual_seed(0)
    config = transformers.Aimv2VisionConfig(hidden_size=48, intermediate_size=136, num_hidden_layers=2,
                                            num_attention_heads=3, patch_size=14, image_size=size, num_channels=3)
    model = perturb_(transformers.Aimv2VisionModel(config), seed=9)
    convert(_save(model, tmp_path / "hf"), str(tmp_path / "jx"), "aimv2")
    images = _images(2, size, size)
    with torch.no_grad():
        out = model(torch.from_numpy(images), output_hidden_states=True)
    got = _medjax(str(tmp_path / "jx"), images)
    ref = out.last_hidden_state.numpy()
    assert max_abs(got["last_hidden_state"], ref) <= PARITY_TOL
    assert max_abs(got["debug_last_block_prenorm"], out.hidden_states[-1].numpy()) <= PARITY_TOL
    assert max_abs(got["linear_head_input"], ref.mean(1)) <= PARITY_TOL
    assert max_abs(got["attention_head_input"], ref) <= PARITY_TOL
