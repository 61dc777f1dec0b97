"""The demo with the tiny DINOv3 ViT of tests/fixtures/dinov3 (converted on first use) at 32 px instead of the tiny
DINOv2: tests/test_dinov3.py runs the trainer, predict, explain and export on it (also from an official hub file, whose
RoPE periods are the model's `rope` variable collection)."""

import os

from configs import demo

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "dinov3")


def get_config():
    c = demo.get_config()
    c.model.family = "dinov3"
    c.model.convert_from.update({"checkpoint": os.path.join(FIXTURE, "model.safetensors"), "model": "dinov3",
                                 "config": os.path.join(FIXTURE, "config.json")})
    c.image_size = 32
    return c
