"""The DINOv3 ConvNeXts (`model.py`), their converter key tables for the transformers and the official
facebookresearch/dinov3 namings and their variants (`convert.py`), and their contract with the engine."""

from medjax.models.dinov3_convnext.model import *  # noqa: F401,F403 (the package is the model's namespace)
from medjax.models.dinov3_convnext.model import (
                                                 FAMILY,
                                                 DINOv3ConvNext,
                                                 DINOv3ConvNextConfig,
                                                 gradcam_layer,
                                                 layers,
                                                 lora_targets,
)
from medjax.models.family import Family

FAMILIES = [Family(FAMILY, DINOv3ConvNextConfig, DINOv3ConvNext, layers=layers, stem="stages_0/downsample_conv/kernel",
                   lora_targets=lora_targets, gradcam_layer=gradcam_layer)]
