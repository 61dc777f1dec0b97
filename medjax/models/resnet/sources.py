"""torchvision's ImageNet ResNets (`ResNet*_Weights.IMAGENET1K_V1`, what `pretrained=True` gave the companion
studies), URLs from `torchvision/models/resnet.py`; the 8 hex digits of each file name are the start of its SHA-256
(torch.hub `check_hash`). Sizes: the enums' `_file_size` (MiB)."""

from medjax.weights.registry import Source, torch_hub_digest, url

_BASE = "https://download.pytorch.org/models"


def _tv(name: str, filename: str, mb: float) -> Source:
    address = f"{_BASE}/{filename}"
    return Source(name, name, (url(address, mb, torch_hub_digest(address)),), "BSD-3-Clause",
                  note=f"torchvision {name}, IMAGENET1K_V1")


SOURCES = [
    _tv("resnet50", "resnet50-0676ba61.pth", 97.781),
    _tv("resnet152", "resnet152-394f9c45.pth", 230.434),
]
