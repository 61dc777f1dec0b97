"""The demo with the tiny DINOv3 ViT of tests/fixtures/dinov3 (converted on first use) at 32 px instead of the tiny
DINOv2: test_dinov3.py runs the trainer, predict, explain and export on it (also from an official hub file, whose
RoPE periods are the model's `rope` variable collection)."""

from medjax.schema import load_recipe
from medjax.testing import fixture_path


def get_config():
    c = load_recipe("demo")
    c.model.family = "dinov3"
    c.model.convert_from.update({"checkpoint": fixture_path("dinov3", "model.safetensors"), "model": "dinov3",
                                 "config": fixture_path("dinov3", "config.json")})
    c.image_size = 32
    return c
