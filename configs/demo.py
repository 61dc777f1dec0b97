"""The embedded default: trains end to end with nothing downloaded, in about 18 s on 2 quiet CPU cores.

Synthetic CheXpert-layout data (written on first use under WORKDIR/data) and the bundled tiny DINOv2 (official
torch.hub format, random perturbed weights; converted on first use) with a linear head, fully fine-tuned at 56 px.
"""

import os

import medjax
from medjax.schema import study_config

ASSET = os.path.join(os.path.dirname(medjax.__file__), "assets", "tiny_dinov2")


def get_config():
    c = study_config()
    c.dataset = "chexpert"
    c.data_root = ""  # unset: the synthetic data goes to WORKDIR/data/chexpert
    c.fake_data = 800
    c.image_size = 56

    c.model.family = "dinov2"
    c.model.convert_from.update({"checkpoint": os.path.join(ASSET, "checkpoint.pth"), "model": "dinov2",
                                 "config": os.path.join(ASSET, "config.json")})
    c.model.freeze = "full"
    c.model.attention_head.update({"width": 48, "depth": 1, "num_heads": 3, "grid": 4})

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 10

    c.batch_size = 16
    c.epochs = 8
    c.log_every = 5
    c.compute_dtype = "float32"
    return c
