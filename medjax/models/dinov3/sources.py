"""Official checkpoints of the DINOv3 ViT family, by upstream name (the torch.hub entry points of
facebookresearch/dinov3, `hubconf.py`).

The weights are gated: Meta sends the download links after its DINOv3 licence is accepted, and the Hugging Face
repos `facebook/dinov3-*-pretrain-lvd1689m` need the same acceptance. The registry records the Hugging Face files
(transformers naming, converted with the variant of the same shape); fetch them with your token's access through a
mirror, give the link Meta sent with `python -m converters fetch NAME --url URL`, or a file downloaded by hand with
`--from-file PATH`. No digest is published. Sizes are approximate (parameters x 4 bytes, MiB).
"""

from medjax.weights.registry import hf_source

_REPO = "facebook/dinov3-{}-pretrain-lvd1689m"
_LICENCE = "DINOv3 License"
_NOTE = ("gated: accept the DINOv3 licence, then --url with the link Meta sends, or --from-file; "
         "Hugging Face {} (DINOv3ViTModel)")

SOURCES = [
    hf_source(f"dinov3_{arch}", f"dinov3_{arch}", _REPO.format(arch), "model.safetensors", mb, _LICENCE,
              _NOTE.format(_REPO.format(arch)))
    for arch, mb in (("vits16", 83), ("vits16plus", 111), ("vitb16", 327), ("vitl16", 1157), ("vith16plus", 3212),
                     ("vit7b16", 25640))
]
