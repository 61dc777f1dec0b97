"""torchvision's ImageNet ResNets (`ResNet*_Weights.IMAGENET1K_V1`, what `pretrained=True` gave the companion
studies), URLs from `torchvision/models/resnet.py`; the 8 hex digits of each file name are the start of its SHA-256
(torch.hub `check_hash`). Sizes: the enums' `_file_size` (MiB)."""

from medjax.weights.registry import torchvision as _tv

SOURCES = [
    _tv("resnet50", "resnet50-0676ba61.pth", 97.781),
    _tv("resnet152", "resnet152-394f9c45.pth", 230.434),
]
