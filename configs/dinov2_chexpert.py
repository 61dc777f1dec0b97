"""DINOv2 ViT-B/14 on CheXpert (v1.0-small) with the reference recipe of the study (SPEC section 6).

Before running: convert the official checkpoint once,
    python -m converters dinov2_vitb14_pretrain.pth /data/medjax/dinov2_vitb14 --model dinov2_vitb14
and point data_root at the CheXpert-v1.0-small folder (holding train.csv). Every field is explained in
medjax/schema.py.
"""

from medjax.schema import study_config


def get_config():
    c = study_config()
    c.dataset = "chexpert"
    c.data_root = "/data/CheXpert-v1.0-small"
    c.data_options.uncertain = "zeros"  # U-Zeroes; "ones" for U-Ones
    c.data_options.frontal_only = False
    c.model.family = "dinov2"
    c.model.pretrained = "/data/medjax/dinov2_vitb14"
    c.optim.warmup_steps = 1000  # ISIC / CheXpert: 1000 iterations; DDSM / APTOS: warmup_epochs = 5
    return c
