"""torchvision ResNet (v1.5; also ResNeXt and Wide ResNet, `model.py`), its converter key tables and variants
(`convert.py`), and its contract with the engine."""

from medjax.models.family import Family
from medjax.models.resnet.model import *  # noqa: F401,F403 (the package is the model's namespace)
from medjax.models.resnet.model import FAMILY, ResNet, ResNetConfig, layers, lora_targets

FAMILIES = [Family(FAMILY, ResNetConfig, ResNet, layers=layers, stem="conv1/kernel", lora_targets=lora_targets,
                   probe_pooled_only=True,
                   gradcam_layer=lambda c: f"layer{len(c.layers)}_{c.layers[-1] - 1}")]  # the last residual block
