"""Official checkpoints of the distilled DINOv3 ConvNeXt family, by upstream name (facebookresearch/dinov3's
torch.hub entry points). Gated like the ViTs (see medjax/models/dinov3/sources.py): `--url` with the link Meta sends
after the licence is accepted, or `--from-file`. No digest is published; sizes are approximate (MiB)."""

from medjax.weights.registry import hf_source

_REPO = "facebook/dinov3-convnext-{}-pretrain-lvd1689m"

SOURCES = [
    hf_source(f"dinov3_convnext_{size}", f"dinov3_convnext_{size}", _REPO.format(size), "model.safetensors", mb,
              "DINOv3 License", f"gated: accept the DINOv3 licence, then --url or --from-file; Hugging Face "
              f"{_REPO.format(size)}")
    for size, mb in (("tiny", 109), ("small", 189), ("base", 334), ("large", 754))
]
