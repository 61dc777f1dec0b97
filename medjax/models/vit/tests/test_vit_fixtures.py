"""Parity with the official-format fixtures (upstream PyTorch outputs), through the two CLIs a user runs."""

import os

import numpy as np
import pytest

from medjax.testing import assert_fixture_outputs, convert_and_embed, fixture_path, max_abs

CASES = [  # (fixture, checkpoint file, --model)
    ("dinov2", "checkpoint.pth", "dinov2"),
    ("mae", "checkpoint.pth", "mae"),
    ("deit", "checkpoint.pth", "deit"),
    ("clip", "open_clip_model.safetensors", "clip"),
    ("clip", "open_clip_pytorch_model.bin", "clip"),
    ("coca", "open_clip_model.safetensors", "coca"),
    ("coca", "open_clip_pytorch_model.bin", "coca"),
    ("aimv2", "model.safetensors", "aimv2"),
    ("aimv2", "hf_native/model.safetensors", "aimv2"),  # the same weights in transformers' Aimv2VisionModel naming
]
# debug_* arrays medjax does not produce: DeiT's ImageNet classifier output (the head is dropped on purpose), and
# DINOv2's interpolated pos-embed, which is checked in test_vit.py instead.
NOT_PRODUCED = {"debug_logits", "debug_interpolated_pos_embed"}


@pytest.mark.parametrize("family,checkpoint,model", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_fixture_parity_through_clis(tmp_path, family, checkpoint, model):
    config = fixture_path(family, os.path.dirname(checkpoint), "config.json")  # hf_native/ has its own
    got, expected, _ = convert_and_embed(tmp_path, family, checkpoint, model, config)
    assert len(assert_fixture_outputs(got, expected, family, NOT_PRODUCED)) >= 1
    assert "linear_head_input" in got.files and "attention_head_input" in got.files


def test_dinov2_fixture_interpolated_pos_embed(matmul_f32):
    """The run-time pos-embed resize (7x7 grid -> 4x4, offset 0.1 scale factor) equals upstream's."""
    import json

    import jax.numpy as jnp

    from medjax.conversion import read_state_dict
    from medjax.models.vit import convert as vit
    from medjax.models.vit import interpolate_pos_embed

    with open(fixture_path("dinov2", "config.json")) as f:
        config = vit.dinov2_config(json.load(f))
    pos = read_state_dict(fixture_path("dinov2", "checkpoint.pth"))["pos_embed"]
    got = interpolate_pos_embed(config, jnp.asarray(pos), (4, 4), (56, 56))
    expected = np.load(fixture_path("dinov2", "expected.npz"))["debug_interpolated_pos_embed"]
    assert max_abs(got, expected) <= 1e-6
