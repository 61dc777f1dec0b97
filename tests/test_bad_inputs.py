"""Loud, safe loading: every way a checkpoint can be wrong gets one clear error naming each key or file."""

import json
import os

import numpy as np
import pytest
import torch

import converters
from converters import CheckpointError, ConversionError
from medjax.testing import fixture_path, run_cli

DINO_CKPT, DINO_CFG = fixture_path("dinov2", "checkpoint.pth"), fixture_path("dinov2", "config.json")


def _dino_state():
    return torch.load(DINO_CKPT, weights_only=True)


def _convert(path, tmp_path, model="dinov2", config=DINO_CFG):
    return converters.convert(str(path), str(tmp_path / "out"), model, config)


def test_missing_unexpected_and_mismatched_keys_reported_together(tmp_path):
    state = _dino_state()
    del state["blocks.1.attn.qkv.weight"], state["norm.bias"]
    state["blocks.0.extra.weight"] = torch.zeros(3)
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(7, 48)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ConversionError) as info:
        _convert(tmp_path / "bad.pth", tmp_path)
    e, msg = info.value, str(info.value)
    assert any("blocks.1.attn.qkv.weight" in m for m in e.missing) and any("norm.bias" in m for m in e.missing)
    assert any("blocks.0.extra.weight" in u for u in e.unexpected)
    assert any("blocks.0.mlp.fc1.weight" in m and "(48, 7)" in m and "(48, 192)" in m for m in e.mismatched)
    assert str(tmp_path / "bad.pth") in msg
    assert not (tmp_path / "out").exists(), "nothing is written when conversion fails"


def test_missing_part_of_split_qkv_names_the_source_key(tmp_path):
    import transformers

    model = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                         intermediate_size=64, image_size=32, patch_size=16))
    model.save_pretrained(tmp_path / "hf")
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "hf" / "model.safetensors")
    del state["encoder.layer.0.attention.attention.key.weight"]
    save_file(state, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(ConversionError) as info:
        converters.convert(str(tmp_path / "hf"), str(tmp_path / "out"), "deit")
    assert info.value.missing == ["encoder.layer.0.attention.attention.key.weight (for blocks_0/attn/qkv/kernel)"]


def test_wrong_model_mae_checkpoint_as_dinov2(tmp_path):
    with pytest.raises(ConversionError) as info:
        _convert(fixture_path("mae", "checkpoint.pth"), tmp_path, "dinov2", DINO_CFG)
    msg = str(info.value)
    assert "blocks.0.ls1.gamma" in msg and "blocks.1.ls2.gamma" in msg  # MAE has no LayerScale
    assert "pos_embed" in msg  # 4x4 grid + CLS vs DINOv2's 7x7


def test_wrong_family_clip_checkpoint_as_dinov2(tmp_path):
    with pytest.raises(CheckpointError, match="not a dinov2 checkpoint.*looks like a clip checkpoint"):
        _convert(fixture_path("clip", "open_clip_model.safetensors"), tmp_path)


def test_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": {"cls_token": torch.zeros(1)}, "payload": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused to load.*code execution"):
        _convert(tmp_path / "evil.pth", tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["checkpoint.pth", "open_clip_model.safetensors"])
def test_truncated_file(tmp_path, name):
    family = "clip" if name.endswith("safetensors") else "dinov2"
    data = open(fixture_path(family, name), "rb").read()
    path = tmp_path / name
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        _convert(path, tmp_path, family, fixture_path(family, "config.json"))
    assert str(path) in str(info.value)


def test_missing_file_unknown_model_and_bad_config(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        _convert(tmp_path / "nope.pth", tmp_path)
    with pytest.raises(CheckpointError, match="unknown --model 'dinov4'.*dinov2_vitb14"):
        _convert(DINO_CKPT, tmp_path, "dinov4")
    with pytest.raises(CheckpointError, match="needs --config"):
        _convert(DINO_CKPT, tmp_path, "dinov2", None)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="bad.json: not valid JSON"):
        _convert(DINO_CKPT, tmp_path, "dinov2", str(tmp_path / "bad.json"))
    cfg = json.load(open(DINO_CFG)) | {"embed_dimension": 48}
    (tmp_path / "typo.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unsupported constructor arguments \['embed_dimension'\]"):
        _convert(DINO_CKPT, tmp_path, "dinov2", str(tmp_path / "typo.json"))


def test_cli_reports_error_and_exit_code(tmp_path):
    proc = run_cli("converters", fixture_path("mae", "checkpoint.pth"), str(tmp_path / "o"), "--model", "dinov2",
                   "--config", DINO_CFG, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: checkpoint") and "missing keys" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_embed_errors(tmp_path):
    proc = run_cli("medjax.embed", "--params", str(tmp_path), "--images", str(tmp_path / "none.npy"), "--output",
                   "y.npz", check=False)
    assert proc.returncode == 2 and "none.npy" in proc.stderr
    np.save(tmp_path / "gray.npy", np.zeros((1, 1, 56, 56), np.float32))
    proc = run_cli("medjax.embed", "--params", str(tmp_path), "--images", str(tmp_path / "gray.npy"), "--output",
                   "y.npz", check=False)
    assert proc.returncode == 2 and "not a converted backbone" in proc.stderr
    _convert(DINO_CKPT, tmp_path)
    proc = run_cli("medjax.embed", "--params", str(tmp_path / "out"), "--images", str(tmp_path / "gray.npy"),
                   "--output", str(tmp_path / "y.npz"), check=False)
    assert proc.returncode == 2 and "NCHW with 3 channels" in proc.stderr
    np.save(tmp_path / "odd.npy", np.zeros((1, 3, 50, 56), np.float32))
    proc = run_cli("medjax.embed", "--params", str(tmp_path / "out"), "--images", str(tmp_path / "odd.npy"),
                   "--output", str(tmp_path / "y.npz"), check=False)
    assert proc.returncode == 2 and "50x56 px is not a multiple of the patch size 14" in proc.stderr


def test_tampered_params_file_is_caught(tmp_path):
    from safetensors.numpy import load_file, save_file

    from medjax import models, pretrained

    _convert(DINO_CKPT, tmp_path)
    params_file = tmp_path / "out" / pretrained.PARAMS_FILE
    flat = load_file(params_file)
    del flat["norm/bias"]
    save_file(flat, params_file)
    with pytest.raises(ValueError, match="missing norm/bias"):
        models.load_pretrained(str(tmp_path / "out"))


def test_ema_selection(tmp_path):
    state = _dino_state()
    noisy = {k: v + 1.0 for k, v in state.items()}
    torch.save({"model": noisy, "model_ema": state}, tmp_path / "both.pth")
    converters.convert(str(tmp_path / "both.pth"), str(tmp_path / "plain"), "dinov2", DINO_CFG)
    converters.convert(str(tmp_path / "both.pth"), str(tmp_path / "ema"), "dinov2", DINO_CFG, ema=True)
    from medjax import models

    norm_bias = state["norm.bias"].numpy()
    assert np.allclose(models.load_pretrained(str(tmp_path / "ema"))[1]["params"]["norm"]["bias"], norm_bias)
    assert np.allclose(models.load_pretrained(str(tmp_path / "plain"))[1]["params"]["norm"]["bias"], norm_bias + 1.0)
    with pytest.raises(CheckpointError, match="no 'model_ema' entry"):
        converters.convert(DINO_CKPT, str(tmp_path / "x"), "dinov2", DINO_CFG, ema=True)


def test_coca_checkpoint_without_its_pooler(tmp_path):
    from safetensors.numpy import load_file, save_file

    state = {k: v for k, v in load_file(fixture_path("coca", "open_clip_model.safetensors")).items()
             if not k.startswith("visual.attn_pool.")}
    save_file(state, tmp_path / "no_pooler.safetensors")
    with pytest.raises(ConversionError) as info:
        converters.convert(str(tmp_path / "no_pooler.safetensors"), str(tmp_path / "out"), "coca",
                           fixture_path("coca", "config.json"))
    missing = " ".join(info.value.missing)
    for key in ("attn_pool.query", "attn_pool.attn.q_proj_weight", "attn_pool.attn.k_proj_weight",
                "attn_pool.attn.v_proj_weight", "attn_pool.attn.in_proj_bias", "attn_pool.ln_q.weight",
                "attn_pool.ln_k.bias", "attn_pool.attn.out_proj.weight"):
        assert key in missing, key
    # a CoCa checkpoint given as plain CLIP names the pooler keys as unexpected instead
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 56, "layers": 2, "width": 64, "head_width": 32,
                                           "patch_size": 8}}
    (tmp_path / "clip.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="attn_pool.query"):
        converters.convert(fixture_path("coca", "open_clip_model.safetensors"), str(tmp_path / "out"), "clip",
                           str(tmp_path / "clip.json"))


def test_sam2_checkpoint_given_as_aimv2(tmp_path):
    with pytest.raises(CheckpointError, match="is not a aimv2 checkpoint in any supported format"):
        converters.convert(fixture_path("sam2_hiera", "checkpoint.pt"), str(tmp_path / "out"), "aimv2",
                           fixture_path("aimv2", "config.json"))


@pytest.mark.parametrize("family,name", [("coca", "open_clip_pytorch_model.bin"), ("aimv2", "model.safetensors")])
def test_truncated_issue3_files(tmp_path, family, name):
    data = open(fixture_path(family, name), "rb").read()
    (tmp_path / name).write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        converters.convert(str(tmp_path / name), str(tmp_path / "out"), family, fixture_path(family, "config.json"))
    assert name in str(info.value)


SAVE_WITH_SETTINGS = """
import argparse, sys, types, torch
yacs = types.ModuleType("yacs"); config = types.ModuleType("yacs.config")
class CfgNode(dict):
    pass
CfgNode.__module__ = "yacs.config"; config.CfgNode = CfgNode; yacs.config = config
sys.modules["yacs"], sys.modules["yacs.config"] = yacs, config
state = torch.load(sys.argv[1], weights_only=True)
torch.save({"model": state, "epoch": 3, "args": argparse.Namespace(lr=1e-3, model="x")}, sys.argv[2])
torch.save({"model": state, "config": CfgNode(MODEL=CfgNode(TYPE="vssm"))}, sys.argv[3])
"""


def test_training_checkpoint_with_settings_objects(tmp_path):
    """An argparse.Namespace beside the weights (MAE/DeiT training checkpoints) and a yacs CfgNode (a dict subclass
    torch's safe loader cannot rebuild) are read as inert data, never imported (tests/test_weights.py: a pickle that
    calls code is still refused)."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", SAVE_WITH_SETTINGS, DINO_CKPT, str(tmp_path / "args.pth"),
                    str(tmp_path / "cfg.pth")], check=True)
    assert _convert(tmp_path / "args.pth", tmp_path)["num_params"] > 0
    assert converters.convert(str(tmp_path / "cfg.pth"), str(tmp_path / "out2"), "dinov2", DINO_CFG)["num_params"] > 0


def test_damaged_or_wrong_files_are_named_not_converted(tmp_path):
    """A few flipped bytes inside a .pth's tensor data fail the zip member's CRC-32 (before, they converted with exit
    0 into garbage weights); a CSV or JPEG given as the checkpoint is named for what it is."""
    import zipfile

    src = fixture_path("dinov2", "checkpoint.pth")
    data = bytearray(open(src, "rb").read())
    with zipfile.ZipFile(src) as z:
        member = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_len, extra_len = int.from_bytes(data[member.header_offset + 26:member.header_offset + 28], "little"), \
        int.from_bytes(data[member.header_offset + 28:member.header_offset + 30], "little")
    start = member.header_offset + 30 + name_len + extra_len  # the member's stored bytes
    for k in range(3):
        data[start + 17 + k] ^= 0x5A
    (tmp_path / "bad.pth").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"fails its CRC-32 check") as info:
        converters.convert(str(tmp_path / "bad.pth"), str(tmp_path / "out"), "dinov2", fixture_path("dinov2",
                                                                                                    "config.json"))
    assert member.filename in str(info.value) and not (tmp_path / "out").exists()
    (tmp_path / "labels.csv").write_text("image,label\na.png,1\n")
    (tmp_path / "img.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 64)
    for name, kind in (("labels.csv", "text file"), ("img.jpg", "JPEG")):
        with pytest.raises(CheckpointError, match=f"not a PyTorch checkpoint; it looks like a.*{kind}") as info:
            converters.convert(str(tmp_path / name), str(tmp_path / "out"), "dinov2")
        assert "unpickle" not in str(info.value)
