"""torchvision VGG 11/13/16/19, with and without BatchNorm (`model.py`), its converter key table and variants
(`convert.py`), and its contract with the engine."""

from medjax.models.family import Family
from medjax.models.vgg.model import *  # noqa: F401,F403 (the package is the model's namespace)
from medjax.models.vgg.model import FAMILY, VGG, VGGConfig, layers, lora_targets


def gradcam_layer(config: VGGConfig) -> str:
    """The last convolution (its BatchNorm in the -BN variants), before the last ReLU and max-pool."""
    return f"features_{[i for i, kind, _ in config.layout() if kind in ('conv', 'bn')][-1]}"


FAMILIES = [Family(FAMILY, VGGConfig, VGG, layers=layers, stem="features_0/kernel", lora_targets=lora_targets,
                   probe_pooled_only=True, gradcam_layer=gradcam_layer)]
