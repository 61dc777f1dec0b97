"""The SAM 2.1 Hiera image encoder (trunk + FPN neck, `model.py`), its converter key tables and variants
(`convert.py`), and its contract with the engine."""

from medjax.models.family import Family
from medjax.models.hiera.model import *  # noqa: F401,F403 (the package is the model's namespace)
from medjax.models.hiera.model import FAMILY, HieraConfig, Sam2HieraEncoder, layers, lora_targets

FAMILIES = [Family(FAMILY, HieraConfig, Sam2HieraEncoder, layers=layers, stem="patch_embed/kernel",
                   lora_targets=lora_targets,
                   # the FPN level the features are pooled from (`vision_features`: the coarsest one kept)
                   gradcam_layer=lambda c: f"neck#{len(c.stages) - 1 - c.scalp}")]
