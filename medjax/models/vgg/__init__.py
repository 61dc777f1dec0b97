"""torchvision VGG 11/13/16/19, with and without BatchNorm (`model.py`), its converter key table and variants
(`convert.py`), and its contract with the engine."""

from medjax.models.family import Family
from medjax.models.vgg.model import *  # noqa: F401,F403 (the package is the model's namespace)
from medjax.models.vgg.model import FAMILY, VGG, VGGConfig, layers, lora_targets

FAMILIES = [Family(FAMILY, VGGConfig, VGG, layers=layers, stem="features_0/kernel", lora_targets=lora_targets)]
