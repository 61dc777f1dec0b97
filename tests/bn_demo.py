"""The demo with a small random-init ResNet (BatchNorm: a `batch_stats` collection) instead of the tiny DINOv2: the
trainer tests of model state (resume, sharding, freezing) run on it."""

from configs import demo


def get_config():
    c = demo.get_config()
    c.model.family = "resnet"
    c.model.convert_from.update({"checkpoint": "", "model": "", "config": ""})
    c.model.architecture = {"block": "basic", "layers": (1, 1, 1, 1), "num_classes": 0, "img_size": 32}
    c.image_size = 32
    return c
