"""torchvision's ImageNet DenseNets (`DenseNet*_Weights.IMAGENET1K_V1`), URLs from `torchvision/models/densenet.py`;
the file-name hash is the start of the SHA-256. Sizes: the enums' `_file_size` (MiB)."""

from medjax.weights.registry import torchvision as _tv

SOURCES = [
    _tv("densenet121", "densenet121-a639ec97.pth", 30.845),
    _tv("densenet201", "densenet201-c1103571.pth", 77.373),
]
