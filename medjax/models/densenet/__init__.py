"""torchvision DenseNet (`model.py`), its converter key tables for both namings of its files and its variants
(`convert.py`), and its contract with the engine."""

from medjax.models.densenet.model import *  # noqa: F401,F403 (the package is the model's namespace)
from medjax.models.densenet.model import FAMILY, DenseNet, DenseNetConfig, layers, lora_targets
from medjax.models.family import Family

FAMILIES = [Family(FAMILY, DenseNetConfig, DenseNet, layers=layers, stem="conv0/kernel", lora_targets=lora_targets,
                   probe_pooled_only=True,
                   gradcam_layer=lambda c: "norm5")]  # the final BatchNorm (its ReLU'd output is pooled)
