"""The study's benchmark grid (SPEC sections 2, 4, 6): backbone x dataset x head x freeze, built from one table.

    python -m medjax.main --config=configs/grid.py:model=dinov2_b,dataset=chexpert,head=linear,freeze=frozen \
        --workdir=runs/dinov2_b/chexpert/linear_frozen [--config.weights_dir=DIR] [--config.data_dir=DIR]
    python -m medjax.grid list --filter dataset=chexpert      # the cells; `run` runs them one by one

Every cell uses the study's recipe: AdamW lr 1e-4, weight decay 1e-5, the reference warm-up (1000 iterations for
CheXpert and ISIC, 5 epochs for DDSM and APTOS, then constant), batch 64, 100 epochs, bf16 compute, 224 px (valid
for every backbone: a multiple of 32 for SAM2 and VMamba, of 14 / 16 / 32 for the ViTs), grayscale stems for
CheXpert and DDSM.

Weights: convert each official checkpoint once into `{weights_dir}/{variant}` (the variant names of `converters`),
e.g. `python -m converters dinov2_vitb14_pretrain.pth $MEDJAX_WEIGHTS/dinov2_vitb14 --model dinov2_vitb14`. The
attention head also needs `{weights_dir}/deit_base_patch16_224`. Data: each dataset in its public layout under
`{data_dir}/{folder}` (DATASETS below). Defaults: $MEDJAX_WEIGHTS or /data/medjax, $MEDJAX_DATA or /data; the paths
follow `--config.weights_dir` / `--config.data_dir` overrides.
"""

import os

import ml_collections
from ml_collections import config_dict

from configs.common import study_config

# model key: (name in the study's table, converter variant = folder under weights_dir, family,
#             backbone parameters in millions as medjax counts them (converted, no head), in the study's table)
BACKBONES = {
    "vmamba_s": ("VMamba-S", "vmamba_small", "vmamba", 49.38, True),
    "vmamba_b": ("VMamba-B", "vmamba_base", "vmamba", 87.53, True),
    "sam2_b+": ("SAM2-B+", "sam2.1_hiera_b+", "sam2_hiera", 69.11, True),
    "sam2_l": ("SAM2-L", "sam2.1_hiera_l", "sam2_hiera", 212.70, True),
    "mae_b": ("MAE-B", "mae_vit_base_patch16", "mae", 85.80, True),
    "mae_l": ("MAE-L", "mae_vit_large_patch16", "mae", 303.30, True),
    "mae_h": ("MAE-H", "mae_vit_huge_patch14", "mae", 630.76, True),
    "coca_b": ("CoCa-B", "coca_vit_b32", "coca", 89.16, True),
    "coca_l": ("CoCa-L", "coca_vit_l14", "coca", 306.72, True),
    "dinov2_b": ("DINOv2-B", "dinov2_vitb14", "dinov2", 86.58, True),
    "dinov2_l": ("DINOv2-L", "dinov2_vitl14", "dinov2", 304.37, True),
    "aimv2_l": ("AIMv2-L", "aimv2_large_patch14_224", "aimv2", 309.20, True),
    "aimv2_h": ("AIMv2-H", "aimv2_huge_patch14_224", "aimv2", 680.85, True),
    "clip_b16": ("CLIP-B/16", "clip_vit_b16", "clip", 86.19, False),
    "dinov2_s": ("DINOv2-S", "dinov2_vits14", "dinov2", 22.06, False),
    "dinov2_g": ("DINOv2-g", "dinov2_vitg14", "dinov2", 1136.48, False),
}

# dataset: (folder under data_dir, its public layout; the warm-up; reader options)
DATASETS = {
    "chexpert": ("CheXpert-v1.0-small", {"warmup_steps": 1000}, {"uncertain": "zeros", "frontal_only": False}),
    "ddsm": ("ddsm", {"warmup_epochs": 5}, {}),
    "isic2019": ("isic-2019", {"warmup_steps": 1000}, {}),
    "aptos2019": ("aptos2019", {"warmup_epochs": 5}, {}),
}
HEADS = ("linear", "attention")
FREEZE = ("frozen", "full")
AXES = {"model": tuple(BACKBONES), "dataset": tuple(DATASETS), "head": HEADS, "freeze": FREEZE}
DEIT_VARIANT = "deit_base_patch16_224"  # the body of the attention head (SPEC section 4)


def cells():
    """Every cell of the grid, in table order: dicts {model, dataset, head, freeze}."""
    return [{"model": m, "dataset": d, "head": h, "freeze": f}
            for m in BACKBONES for d in DATASETS for h in HEADS for f in FREEZE]


def cell_arg(cell):
    """The config argument of a cell: `model=...,dataset=...,head=...,freeze=...`."""
    return ",".join(f"{k}={cell[k]}" for k in AXES)


def parse_arg(arg):
    """`model=dinov2_b,dataset=chexpert[,head=linear][,freeze=frozen]` -> a cell dict (errors name the choices)."""
    if not arg:
        raise ValueError("configs/grid.py needs a cell, e.g. --config=configs/grid.py:model=dinov2_b,dataset=chexpert,"
                         "head=linear,freeze=frozen (`python -m medjax.grid list` prints them all)")
    cell = {"head": "linear", "freeze": "frozen"}
    for item in arg.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in AXES:
            raise ValueError(f"configs/grid.py: bad item {item!r} in {arg!r}; expected key=value with key in "
                             f"{', '.join(AXES)}")
        if value not in AXES[key]:
            raise ValueError(f"configs/grid.py: {key}={value!r} is not in the grid; choices: {', '.join(AXES[key])}")
        cell[key] = value
    missing = [k for k in ("model", "dataset") if k not in cell]
    if missing:
        raise ValueError(f"configs/grid.py: {arg!r} names no {' and no '.join(missing)}")
    return cell


def get_config(arg=None):
    cell = parse_arg(arg)
    name, variant, family, params_m, in_study = BACKBONES[cell["model"]]
    folder, warmup, data_options = DATASETS[cell["dataset"]]

    c = study_config()
    # Locations: references, so that --config.weights_dir / --config.data_dir move every path built from them.
    c.weights_dir = config_dict.FieldReference(os.environ.get("MEDJAX_WEIGHTS", "/data/medjax"))
    c.data_dir = config_dict.FieldReference(os.environ.get("MEDJAX_DATA", "/data"))
    c.grid_cell = ml_collections.ConfigDict({
        **cell, "arg": cell_arg(cell), "backbone": name, "variant": variant, "params_m": params_m,
        "in_study": in_study})

    c.dataset = cell["dataset"]
    c.data_root = c.get_ref("data_dir") + f"/{folder}"
    for key, value in data_options.items():
        c.data_options[key] = value
    c.model.family = family
    c.model.pretrained = c.get_ref("weights_dir") + f"/{variant}"
    c.model.head = cell["head"]
    c.model.freeze = cell["freeze"]
    c.model.attention_head.deit_params = (c.get_ref("weights_dir") + f"/{DEIT_VARIANT}"
                                          if cell["head"] == "attention" else "")
    if "warmup_steps" in warmup:  # CheXpert / ISIC: 1000 iterations; DDSM / APTOS: 5 epochs
        c.optim.warmup_steps = warmup["warmup_steps"]
    c.optim.warmup_epochs = warmup.get("warmup_epochs", 0)
    return c
