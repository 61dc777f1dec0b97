"""Official checkpoints of the ViT family, by upstream name (read by `medjax.weights`; `python -m converters list`).

Where each URL was read: DINOv2 `dinov2/hub/backbones.py` and `classifiers.py` (`_DINOV2_BASE_URL` +
`/{base}/{full}_pretrain.pth`, `_linear4_head.pth` for the `_lc` entry points' default `layers=4`); MAE's README;
DeiT's `models.py` (`check_hash=True`: the file-name hash is checked); open_clip `pretrained.py` (hub ids; the file is
open_clip's `HF_WEIGHTS_NAME`, `open_clip_pytorch_model.bin`); AIMv2 apple's Hugging Face repos; the transformers
baselines of the radiology study. None of these publishers gives a digest except DeiT's file name.
Sizes are approximate (parameter count x 4 bytes, MiB).
"""

from medjax.weights.registry import Source, hf, torch_hub_digest, url

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
    Source("mae_pretrain_vit_base", "mae_vit_base_patch16", (url(f"{_MAE}/mae_pretrain_vit_base.pth", 330),),
           "CC-BY-NC-4.0", note="facebookresearch/mae README, ViT-Base pre-trained checkpoint"),
    Source("mae_pretrain_vit_large", "mae_vit_large_patch16", (url(f"{_MAE}/mae_pretrain_vit_large.pth", 1160),),
           "CC-BY-NC-4.0", note="facebookresearch/mae README, ViT-Large"),
    Source("mae_pretrain_vit_huge", "mae_vit_huge_patch14", (url(f"{_MAE}/mae_pretrain_vit_huge.pth", 2410),),
           "CC-BY-NC-4.0", note="facebookresearch/mae README, ViT-Huge"),
    Source("deit_base_patch16_224", "deit_base_patch16_224", (url(_DEIT, 330, torch_hub_digest(_DEIT)),),
           "Apache-2.0", note="facebookresearch/deit, the attention head's DeiT-B body"),
    Source("aimv2_large_patch14_224", "aimv2_large_patch14_224",
           (hf("apple/aimv2-large-patch14-224", "model.safetensors", 1230),), "apple-amlr",
           note="Hugging Face apple/aimv2-large-patch14-224"),
    Source("aimv2_huge_patch14_224", "aimv2_huge_patch14_224",
           (hf("apple/aimv2-huge-patch14-224", "model.safetensors", 2470),), "apple-amlr",
           note="Hugging Face apple/aimv2-huge-patch14-224"),
    Source("coca_ViT-B-32", "coca_vit_b32",
           (hf("laion/CoCa-ViT-B-32-laion2B-s13B-b90k", "open_clip_pytorch_model.bin", 970),), "MIT",
           note="open_clip coca_ViT-B-32 / laion2b_s13b_b90k (image tower kept)"),
    Source("coca_ViT-L-14", "coca_vit_l14",
           (hf("laion/CoCa-ViT-L-14-laion2B-s13B-b90k", "open_clip_pytorch_model.bin", 2430),), "MIT",
           note="open_clip coca_ViT-L-14 / laion2b_s13b_b90k (image tower kept)"),
    Source("ViT-B-16", "clip_vit_b16",
           (hf("laion/CLIP-ViT-B-16-laion2B-s34B-b88K", "open_clip_pytorch_model.bin", 570),), "MIT",
           note="open_clip ViT-B-16 / laion2b_s34b_b88k (image tower kept)"),
    Source("ViT-H-14", "clip_vit_h14",
           (hf("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "open_clip_pytorch_model.bin", 3760),), "MIT",
           note="open_clip ViT-H-14 / laion2b_s32b_b79k (image tower kept)"),
    Source("BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", "biomedclip_vit_base_patch16_224",
           (hf("microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", "open_clip_pytorch_model.bin", 750),),
           "MIT", note="open_clip hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 (image tower)"),
    Source("vit-large-patch16-224-in21k", "vit_large_patch16_224_in21k",
           (hf("google/vit-large-patch16-224-in21k", "pytorch_model.bin", 1160),), "Apache-2.0",
           note="transformers google/vit-large-patch16-224-in21k (ViTModel, with its pooler)"),
    Source("vit-msn-large", "vit_msn_large", (hf("facebook/vit-msn-large", "pytorch_model.bin", 1160),),
           "Apache-2.0", note="transformers facebook/vit-msn-large"),
    Source("vit-mae-large", "vit_mae_large", (hf("facebook/vit-mae-large", "pytorch_model.bin", 1250),),
           "Apache-2.0", note="transformers facebook/vit-mae-large read as a ViT (the radiology study's MAE-L)"),
    Source("CLIP-ViT-H-14-laion2B-s32B-b79K", "clip_vit_huge_patch14_laion2b",
           (hf("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "pytorch_model.bin", 3760),), "MIT",
           note="transformers laion/CLIP-ViT-H-14-laion2B-s32B-b79K (the radiology study's OpenCLIP-H baseline)"),
    Source("clip-vit-large-patch14", "clip_vit_large_patch14",
           (hf("openai/clip-vit-large-patch14", "pytorch_model.bin", 1630),), "MIT",
           note="transformers openai/clip-vit-large-patch14 (vision tower and projection kept)"),
]
