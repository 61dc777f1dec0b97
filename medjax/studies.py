"""The studies' tables and the benchmark grid (SPEC sections 2, 4, 6, 8, 10): model x dataset x head x freeze, for the
reference study and the two companion studies' baselines; the recipe `configs/grid.py` (`--config=grid:CELL`) is this
module's `get_config`.

    python -m medjax.main --config=configs/grid.py:model=dinov2_b,dataset=chexpert,head=linear,freeze=frozen \
        --workdir=runs/dinov2_b/chexpert/linear_frozen [--config.weights_dir=DIR] [--config.data_dir=DIR]
    python -m medjax.grid list --filter dataset=chexpert      # the cells; `run` runs them one by one
    python -m medjax.grid list --filter study=glioma           # or study=radiology, study=mansoori

The reference study (Mansoori et al.; `study=mansoori`): BACKBONES x DATASETS x {linear, attention} x {frozen,
full}. Every cell uses the study's recipe: AdamW lr 1e-4, weight decay 1e-5, the reference warm-up (1000
iterations for CheXpert and ISIC, 5 epochs for DDSM and APTOS, then constant), batch 64, 100 epochs, bf16 compute,
224 px (valid for every backbone: a multiple of 32 for SAM2 and VMamba, of 14 / 16 / 32 for the ViTs), grayscale
stems for CheXpert and DDSM.

The glioma study (Fu et al.; `study=glioma`): VGG-16, ResNet-50, DenseNet-121 (linear head) and DINOv2 S/B/L with
their ImageNet linear classifiers (`_lc`, MLP head) on its four public datasets, frozen and full, with its protocol
(`glioma_protocol`: Adam lr 1e-4, batch 32, 100 epochs, no augmentation, resize 256 -> crop 224, ImageNet
statistics, best validation accuracy, 5,000 bootstrap resamples).

The radiology study (Baharoon et al.; `study=radiology`): the linear probe (head `probe`, frozen) of DINOv2 S/B/L/g
beside its baselines (ResNet-152, VGG-19, DenseNet-201, ViT-L/16 IN-21k, MSN-L, MAE-L read as a ViT, CLIP ViT-L/14,
OpenCLIP ViT-H/14, SAM ViT-L at 1024 px, BiomedCLIP) on NIH ChestX-ray14, CheXpert (frontal) and the Figshare brain
tumours. These cells run the protocol, not the trainer: `python -m medjax.grid run` (or `python -m medjax.grid probe
ARG --workdir DIR`) writes their metrics.json; `medjax.main` would train a frozen linear head instead.

The next generation (`study=nextgen`, docs/next_generation.md): DINOv3-B/L, DINOv3-ConvNeXt-B, SigLIP 2-B and
MedSigLIP on the reference study's datasets x {linear, attention} x {frozen, full} with its recipe.

Weights: convert each official checkpoint once into `{weights_dir}/{folder}` (the variant names of `converters`),
e.g. `python -m converters dinov2_vitb14_pretrain.pth $MEDJAX_WEIGHTS/dinov2_vitb14 --model dinov2_vitb14`; the
`_lc` folders with `--linear-head dinov2_vitb14_linear_head.pth` (`grid_cell.convert` of a cell says how). The
attention head also needs `{weights_dir}/deit_base_patch16_224`. Data: each dataset in its public layout under
`{data_dir}/{folder}` (DATASETS, GLIOMA_DATASETS, RADIOLOGY_DATASETS below). Defaults: $MEDJAX_WEIGHTS or
/data/medjax, $MEDJAX_DATA or /data; the paths follow `--config.weights_dir` / `--config.data_dir` overrides.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from medjax import models
from medjax.schema import study_config

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
DEIT_VARIANT = "deit_base_patch16_224"  # the body of the attention head (SPEC section 4)


class Model(NamedTuple):
    """A model of the companion studies' tables."""

    name: str  # the row name in the report
    folder: str  # the converted backbone under weights_dir
    family: str  # medjax's backbone family (what the converter writes for `variant`)
    params_m: float  # backbone parameters in millions as medjax counts them (converted, no head)
    variant: str  # `python -m converters CHECKPOINT {weights_dir}/{folder} --model {variant}`
    kind: str  # "foundation" (the models the studies evaluate) or "baseline" (what they compare them with)
    linear_head: str = ""  # DINOv2 `_lc`: the hub linear classifier file, converted with `--linear-head`
    image_size: int = 224  # the radiology study's input size (SAM's encoder runs at 1024 px)


def _lc(size, name, params_m):
    return Model(f"DINOv2-{name} lc", f"dinov2_vit{size}14_lc", "dinov2", params_m, f"dinov2_vit{size}14", "foundation",
                 f"dinov2_vit{size}14_linear_head.pth")


# The companion studies' models beyond BACKBONES (SPEC section 10; the variant names of `python -m converters`).
COMPANION_MODELS = {
    # the glioma study: ImageNet CNNs (torchvision files) and DINOv2 with its ImageNet linear classifier
    "vgg16": Model("VGG-16", "vgg16", "vgg", 138.36, "vgg16", "baseline"),
    "resnet50": Model("ResNet-50", "resnet50", "resnet", 25.56, "resnet50", "baseline"),
    "densenet121": Model("DenseNet-121", "densenet121", "densenet", 7.98, "densenet121", "baseline"),
    "dinov2_s_lc": _lc("s", "S", 22.83),
    "dinov2_b_lc": _lc("b", "B", 88.12),
    "dinov2_l_lc": _lc("l", "L", 306.42),
    # the radiology study's baselines (MohammedSB/DINOv2ForRadiology --backbone)
    "resnet152": Model("ResNet-152", "resnet152", "resnet", 60.19, "resnet152", "baseline"),
    "vgg19": Model("VGG-19", "vgg19", "vgg", 143.67, "vgg19", "baseline"),
    "densenet201": Model("DenseNet-201", "densenet201", "densenet", 20.01, "densenet201", "baseline"),
    "vit_l16_in21k": Model("ViT-L/16 IN-21k", "vit_large_patch16_224_in21k", "hf_vit", 304.35,
                           "vit_large_patch16_224_in21k", "baseline"),
    "msn_l": Model("MSN-L", "vit_msn_large", "hf_vit", 303.30, "vit_msn_large", "baseline"),
    "vit_mae_l": Model("MAE-L (as a ViT)", "vit_mae_large", "hf_vit", 303.30, "vit_mae_large", "baseline"),
    "clip_l14": Model("CLIP ViT-L/14", "clip_vit_large_patch14", "hf_clip", 303.97, "clip_vit_large_patch14",
                      "baseline"),
    "openclip_h14": Model("OpenCLIP ViT-H/14", "clip_vit_huge_patch14_laion2b", "hf_clip", 632.08,
                          "clip_vit_huge_patch14_laion2b", "baseline"),
    "sam_l": Model("SAM ViT-L", "sam_vit_l", "sam_vit", 308.28, "sam_vit_l", "baseline", image_size=1024),
    "biomedclip": Model("BiomedCLIP", "biomedclip_vit_base_patch16_224", "biomedclip", 86.19,
                        "biomedclip_vit_base_patch16_224", "baseline"),
}

# The next generation beyond the studies (issue 25; `study=nextgen`): DINOv3 (ViT-B/L and the distilled ConvNeXt-B),
# SigLIP 2-B and MedSigLIP on the reference study's datasets, heads and freeze settings with its recipe (224 px:
# MedSigLIP's 32x32 position table is resized to 16x16 at run time). The report shows them beside DINOv2.
NEXT_GENERATION = {
    "dinov3_b": Model("DINOv3-B", "dinov3_vitb16", "dinov3", 85.66, "dinov3_vitb16", "foundation"),
    "dinov3_l": Model("DINOv3-L", "dinov3_vitl16", "dinov3", 303.13, "dinov3_vitl16", "foundation"),
    "dinov3_convnext_b": Model("DINOv3-ConvNeXt-B", "dinov3_convnext_base", "dinov3_convnext", 87.57,
                               "dinov3_convnext_base", "foundation"),
    "siglip2_b": Model("SigLIP 2-B", "siglip2_base_patch16_224", "siglip", 92.88, "siglip2_base_patch16_224",
                       "foundation"),
    "medsiglip": Model("MedSigLIP", "medsiglip_448", "siglip", 428.57, "medsiglip_448", "foundation"),
}

# The glioma study's table (Fu et al.; `glioma_protocol`): its public datasets (the glioma MRI set is private)
# -> folder under data_dir. CNNs take a linear head, the `_lc` models the MLP head; frozen and full.
GLIOMA_MODELS = ("vgg16", "resnet50", "densenet121", "dinov2_s_lc", "dinov2_b_lc", "dinov2_l_lc")
GLIOMA_DATASETS = {"chest_xray_pneumonia": "chest_xray", "ichallenge_amd": "iChallenge-AMD", "ham10000": "HAM10000",
                   "isic2018": "ISIC2018"}

# The radiology study's linear probes (Baharoon et al.; SPEC section 8): DINOv2 beside its baselines, frozen
# features, the head grid (n last blocks x avgpool x lr) selected on validation, retrained on train + val, tested.
# dataset -> (folder under data_dir, reader options as the study read the set)
RADIOLOGY_MODELS = ("dinov2_s", "dinov2_b", "dinov2_l", "dinov2_g", "resnet152", "vgg19", "densenet201",
                    "vit_l16_in21k", "msn_l", "vit_mae_l", "clip_l14", "openclip_h14", "sam_l", "biomedclip")
RADIOLOGY_DATASETS = {
    "nih_chestxray14": ("NIH-ChestXray14", {"no_finding_class": True, "val_rule": "last"}),
    "chexpert": ("CheXpert-v1.0-small", {"uncertain": "zeros", "frontal_only": True}),
    "brain_tumor_figshare": ("brain-tumor-figshare", {}),
}

STUDIES = {  # study key -> its title in the report
    "mansoori": "Mansoori et al. (the reference study)",
    "glioma": "Fu et al. (the glioma study's protocol)",
    "radiology": "Baharoon et al. (the radiology study's linear probes)",
    "nextgen": "the next generation (DINOv3, SigLIP 2, MedSigLIP) on the reference study's grid",
}
AXES = {"model": tuple(dict.fromkeys([*BACKBONES, *GLIOMA_MODELS, *RADIOLOGY_MODELS, *NEXT_GENERATION])),
        "dataset": tuple(dict.fromkeys([*DATASETS, *GLIOMA_DATASETS, *RADIOLOGY_DATASETS])),
        "head": ("linear", "attention", "mlp", "probe"), "freeze": FREEZE}
FILTER_AXES = {**AXES, "study": tuple(STUDIES)}  # `python -m medjax.grid --filter` keys


def model_info(key) -> Model:
    """A model key of any study as a Model (the main study's backbones too)."""
    if key in COMPANION_MODELS:
        return COMPANION_MODELS[key]
    if key in NEXT_GENERATION:
        return NEXT_GENERATION[key]
    name, variant, family, params_m, _ = BACKBONES[key]
    return Model(name, variant, family, params_m, variant, "foundation")


def cells():
    """Every cell of the grid, in table order (the reference study's, the glioma study's, the radiology study's, the
    next generation's): dicts {model, dataset, head, freeze, study}."""
    main = [{"model": m, "dataset": d, "head": h, "freeze": f, "study": "mansoori"}
            for m in BACKBONES for d in DATASETS for h in HEADS for f in FREEZE]
    glioma = [{"model": m, "dataset": d, "head": "mlp" if m.endswith("_lc") else "linear", "freeze": f,
               "study": "glioma"} for m in GLIOMA_MODELS for d in GLIOMA_DATASETS for f in FREEZE]
    radiology = [{"model": m, "dataset": d, "head": "probe", "freeze": "frozen", "study": "radiology"}
                 for m in RADIOLOGY_MODELS for d in RADIOLOGY_DATASETS]
    nextgen = [{"model": m, "dataset": d, "head": h, "freeze": f, "study": "nextgen"}
               for m in NEXT_GENERATION for d in DATASETS for h in HEADS for f in FREEZE]
    return main + glioma + radiology + nextgen


def cell_arg(cell):
    """The config argument of a cell: `model=...,dataset=...,head=...,freeze=...`."""
    return ",".join(f"{k}={cell[k]}" for k in AXES)


def parse_arg(arg):
    """`model=dinov2_b,dataset=chexpert[,head=linear][,freeze=frozen]` -> a cell dict (errors name the choices).
    Without head / freeze, the first cell of the model and dataset in table order (linear / frozen in the
    reference study's grid, the study's own head elsewhere)."""
    if not arg:
        raise ValueError("configs/grid.py needs a cell, e.g. --config=configs/grid.py:model=dinov2_b,dataset=chexpert,"
                         "head=linear,freeze=frozen (`python -m medjax.grid list` prints them all)")
    given = {}
    for item in arg.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in AXES:
            raise ValueError(f"configs/grid.py: bad item {item!r} in {arg!r}; expected key=value with key in "
                             f"{', '.join(AXES)}")
        if value not in AXES[key]:
            raise ValueError(f"configs/grid.py: {key}={value!r} is not in the grid; choices: {', '.join(AXES[key])}")
        given[key] = value
    missing = [k for k in ("model", "dataset") if k not in given]
    if missing:
        raise ValueError(f"configs/grid.py: {arg!r} names no {' and no '.join(missing)}")
    everything = cells()
    match = [c for c in everything if all(c[k] == v for k, v in given.items())]
    if not match:
        of_model = [c for c in everything if c["model"] == given["model"]]
        choices = sorted({f"dataset={c['dataset']},head={c['head']},freeze={c['freeze']}" for c in of_model})
        raise ValueError(f"configs/grid.py: {arg!r} is not a cell of the grid; model={given['model']} runs with "
                         + "; ".join(choices[:12]) + (f"; ... ({len(choices)} in all)" if len(choices) > 12 else ""))
    return dict(match[0])


def get_config(arg=None):
    """The config of one grid cell (`--config=grid:CELL`)."""
    cell = parse_arg(arg)
    model = model_info(cell["model"])
    in_study = BACKBONES[cell["model"]][4] if cell["study"] == "mansoori" else cell["study"] != "nextgen"

    c = study_config()
    # Locations: references, so that --config.weights_dir / --config.data_dir move every path built from them.
    c.weights_dir = os.environ.get("MEDJAX_WEIGHTS", "/data/medjax")
    c.data_dir = os.environ.get("MEDJAX_DATA", "/data")
    c.grid_cell.update({
        **cell, "arg": cell_arg(cell), "backbone": model.name, "variant": model.folder, "params_m": model.params_m,
        "in_study": in_study, "kind": model.kind,
        "convert": f"python -m converters CHECKPOINT {{weights_dir}}/{model.folder} --model {model.variant}"
                   + (f" --linear-head {model.linear_head}" if model.linear_head else "")})
    c.dataset = cell["dataset"]
    c.model.family = model.family
    c.model.pretrained = c.get_ref("weights_dir") + f"/{model.folder}"
    c.model.head = cell["head"] if cell["head"] != "probe" else "linear"
    c.model.freeze = cell["freeze"]
    recipe = {"mansoori": _reference_study, "glioma": _glioma_study, "radiology": _radiology_study,
              "nextgen": _reference_study}[cell["study"]]
    recipe(c, cell, model)
    return c


def _data(c, folder, options):
    c.data_root = c.get_ref("data_dir") + f"/{folder}"
    for key, value in options.items():
        c.data_options[key] = value


def _reference_study(c, cell, model):
    """The study's recipe (module docstring); the attention head's body comes converted from DeiT-B."""
    folder, warmup, data_options = DATASETS[cell["dataset"]]
    _data(c, folder, data_options)
    c.model.attention_head.deit_params = (c.get_ref("weights_dir") + f"/{DEIT_VARIANT}"
                                          if cell["head"] == "attention" else "")
    if "warmup_steps" in warmup:  # CheXpert / ISIC: 1000 iterations; DDSM / APTOS: 5 epochs
        c.optim.warmup_steps = warmup["warmup_steps"]
    c.optim.warmup_epochs = warmup.get("warmup_epochs", 0)


def _glioma_study(c, cell, model):
    """The glioma protocol on the study's public datasets; the `_lc` folders hold the linear classifier."""
    glioma_protocol(c)
    _data(c, GLIOMA_DATASETS[cell["dataset"]], {})


def _radiology_study(c, cell, model):
    """The linear-probe protocol (`python -m medjax.grid probe`, run by `grid run`): ImageNet statistics, the study's
    input size, the DINOv2 head grid; CNNs on their pooled feature alone."""
    folder, data_options = RADIOLOGY_DATASETS[cell["dataset"]]
    _data(c, folder, data_options)
    c.image_size = model.image_size
    c.normalization = "imagenet"
    if models.family(model.family).probe_pooled_only:  # the pooled feature alone: one "block", no patch mean
        c.probe.blocks, c.probe.avgpool = (1,), (False,)


def glioma_protocol(c):
    """The glioma study's training protocol (Fu et al., arXiv 2402.07595; SPEC section 10) set on a config built from
    `medjax.schema.study_config()`; returns it.

    Adam (no weight decay) at a constant lr 1e-4, no gradient clipping, cross-entropy, batch 32, 100 epochs, seed 1;
    no augmentation: train and test images both go through resize 256 -> center crop 224 and ImageNet statistics; the
    best model is the one with the best validation accuracy; test metrics are accuracy and weighted precision / recall /
    F1 (in metrics.json with every other metric), each with a 95% percentile bootstrap interval over 5,000 resamples.

    Heads: DINOv2 `_lc` backbones (converted with `--linear-head`, so the pooled feature is the 1000 ImageNet logits)
    take the MLP head (Linear(1000, 256) -> ReLU -> Linear(256, C)); the torchvision CNNs a linear layer on their pooled
    feature. Frozen: the whole backbone (the `_lc` linear classifier included) is frozen, the head trains.

    Where medjax differs, on purpose or by construction:
    - Splits: the readers' patient-disjoint seeded splits (the study split train 80/20 at random by image, so a
      patient's images could sit in train and val); the study's own test folder where the dataset has one.
    - Grayscale sets (pneumonia X-rays) are read as 1 channel, the RGB stem summed over its input channels
      (`model.grayscale="sum"`), with ImageNet's red-channel statistics; the study replicated gray to RGB.
    - The reported value is the metric of the whole test set; the bootstrap mean the study reported is stored too.
    - Seeds: the bootstrap is seeded (the study's was not).
    """
    c.optim.name = "adam"  # torch.optim.Adam(lr=1e-4): no weight decay
    c.optim.lr = 1e-4
    c.optim.weight_decay = 0.0
    c.optim.schedule = "constant"
    c.optim.warmup_epochs = 0.0
    c.optim.clip = 0.0  # no gradient clipping
    c.batch_size = 32
    c.epochs = 100
    c.seed = 1
    c.train_augment = False  # no augmentation: Resize(256) -> CenterCrop(224) for train and test
    c.image_size = 224
    c.resize = "shorter"  # torchvision's Resize(256): the shorter side to 256, aspect kept, then CenterCrop(224)
    c.normalization = "imagenet"
    c.selection_metric = "accuracy"  # the best model by validation accuracy
    c.bootstrap.resamples = 5000
    c.compute_dtype = "float32"  # the study trained in float32
    c.model.grayscale = "sum"  # closest to replicating a gray image to RGB
    return c
