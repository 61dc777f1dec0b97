"""Official checkpoints of the ViT family, by upstream name (read by `medjax.weights`; `python -m converters list`).

Where each URL was read: DINOv2 `dinov2/hub/backbones.py` and `classifiers.py` (`_DINOV2_BASE_URL` +
`/{base}/{full}_pretrain.pth`, `_linear4_head.pth` for the `_lc` entry points' default `layers=4`); MAE's README;
DeiT's `models.py` (`check_hash=True`: the file-name hash is checked); open_clip `pretrained.py` (hub ids; the file is
open_clip's `HF_WEIGHTS_NAME`, `open_clip_pytorch_model.bin`); AIMv2 apple's Hugging Face repos; the transformers
baselines of the radiology study. None of these publishers gives a digest except DeiT's file name.
Sizes are approximate (parameter count x 4 bytes, MiB).
"""

from medjax.weights.registry import Source, hf_source, torch_hub_digest, url, url_source

_DINOV2 = "https://dl.fbaipublicfiles.com/dinov2"
_DINOV2_SIZES = {"s": (84, 7.3), "b": (330, 14.7), "l": (1160, 19.6), "g": (4400, 29.3)}  # backbone, linear4 head

SOURCES = []
for _s, (_mb, _head_mb) in _DINOV2_SIZES.items():
    _base = f"dinov2_vit{_s}14"
    for _reg in ("", "_reg4"):
        _full = _base + _reg
        _backbone = url(f"{_DINOV2}/{_base}/{_full}_pretrain.pth", _mb)
        _hub = _base + ("_reg" if _reg else "")  # the torch.hub entry points: dinov2_vitb14, dinov2_vitb14_reg
        SOURCES.append(Source(_hub, _full, (_backbone,), "Apache-2.0",
                              note=f"torch.hub facebookresearch/dinov2 {_hub}"))
        SOURCES.append(Source(
            f"{_hub}_lc", _full, (_backbone, url(f"{_DINOV2}/{_base}/{_full}_linear4_head.pth", _head_mb,
                                                 role="linear_head")), "Apache-2.0",
            note=f"torch.hub {_hub}_lc: the backbone with its ImageNet linear classifier (layers=4), lc_logits"))

_MAE = "https://dl.fbaipublicfiles.com/mae/pretrain"
_DEIT = "https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth"

SOURCES += [
    url_source(f"mae_pretrain_vit_{size}", f"mae_vit_{size}_patch{patch}", f"{_MAE}/mae_pretrain_vit_{size}.pth", mb,
               "CC-BY-NC-4.0", f"facebookresearch/mae README, {what}")
    for size, patch, mb, what in (("base", 16, 330, "ViT-Base pre-trained checkpoint"),
                                  ("large", 16, 1160, "ViT-Large"), ("huge", 14, 2410, "ViT-Huge"))
]
SOURCES.append(url_source("deit_base_patch16_224", "deit_base_patch16_224", _DEIT, 330, "Apache-2.0",
                          "facebookresearch/deit, the attention head's DeiT-B body", torch_hub_digest(_DEIT)))
SOURCES += [
    hf_source(f"aimv2_{size}_patch14_224", f"aimv2_{size}_patch14_224", f"apple/aimv2-{size}-patch14-224",
              "model.safetensors", mb, "apple-amlr", f"Hugging Face apple/aimv2-{size}-patch14-224")
    for size, mb in (("large", 1230), ("huge", 2470))
]

# open_clip hub ids (their file `open_clip_pytorch_model.bin`; the image tower is kept), pretrained tag from the repo
SOURCES += [
    hf_source(name, model, repo, "open_clip_pytorch_model.bin", mb, "MIT",
              f"open_clip {name} / {repo[repo.index('laion2B'):].lower().replace('-', '_')} (image tower kept)")
    for name, model, repo, mb in (("coca_ViT-B-32", "coca_vit_b32", "laion/CoCa-ViT-B-32-laion2B-s13B-b90k", 970),
                                  ("coca_ViT-L-14", "coca_vit_l14", "laion/CoCa-ViT-L-14-laion2B-s13B-b90k", 2430),
                                  ("ViT-B-16", "clip_vit_b16", "laion/CLIP-ViT-B-16-laion2B-s34B-b88K", 570),
                                  ("ViT-H-14", "clip_vit_h14", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", 3760))
]
_BIOMEDCLIP = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
SOURCES.append(hf_source(_BIOMEDCLIP.split("/")[1], "biomedclip_vit_base_patch16_224", _BIOMEDCLIP,
                         "open_clip_pytorch_model.bin", 750, "MIT", f"open_clip hf-hub:{_BIOMEDCLIP} (image tower)"))

# transformers models (`pytorch_model.bin`), by their repo's name
SOURCES += [
    hf_source(repo.split("/")[1], model, repo, "pytorch_model.bin", mb, licence, f"transformers {repo}{what}")
    for repo, model, mb, licence, what in (
        ("google/vit-large-patch16-224-in21k", "vit_large_patch16_224_in21k", 1160, "Apache-2.0",
         " (ViTModel, with its pooler)"),
        ("facebook/vit-msn-large", "vit_msn_large", 1160, "Apache-2.0", ""),
        ("facebook/vit-mae-large", "vit_mae_large", 1250, "Apache-2.0",
         " read as a ViT (the radiology study's MAE-L)"),
        ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "clip_vit_huge_patch14_laion2b", 3760, "MIT",
         " (the radiology study's OpenCLIP-H baseline)"),
        ("openai/clip-vit-large-patch14", "clip_vit_large_patch14", 1630, "MIT", " (vision tower and projection kept)"))
]
