"""torchvision's ImageNet VGGs (`VGG*_Weights.IMAGENET1K_V1`), URLs from `torchvision/models/vgg.py`; the file-name
hash is the start of the SHA-256. Sizes: the enums' `_file_size` (MiB)."""

from medjax.weights.registry import torchvision as _tv

SOURCES = [
    _tv("vgg16", "vgg16-397923af.pth", 527.796),
    _tv("vgg16_bn", "vgg16_bn-6c64b313.pth", 527.866),
    _tv("vgg19", "vgg19-dcbb9e9d.pth", 548.051),
]
