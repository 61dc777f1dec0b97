"""torchvision's ImageNet VGGs (`VGG*_Weights.IMAGENET1K_V1`), URLs from `torchvision/models/vgg.py`; the file-name
hash is the start of the SHA-256. Sizes: the enums' `_file_size` (MiB)."""

from medjax.weights.registry import Source, torch_hub_digest, url

_BASE = "https://download.pytorch.org/models"


def _tv(name: str, filename: str, mb: float) -> Source:
    address = f"{_BASE}/{filename}"
    return Source(name, name, (url(address, mb, torch_hub_digest(address)),), "BSD-3-Clause",
                  note=f"torchvision {name}, IMAGENET1K_V1")


SOURCES = [
    _tv("vgg16", "vgg16-397923af.pth", 527.796),
    _tv("vgg16_bn", "vgg16_bn-6c64b313.pth", 527.866),
    _tv("vgg19", "vgg19-dcbb9e9d.pth", 548.051),
]
