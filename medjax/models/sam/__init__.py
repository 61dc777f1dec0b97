"""The SAM v1 image encoder (`segment_anything` ImageEncoderViT: windowed / global attention with decomposed relative
positions and the conv neck, `model.py`), its converter key tables and variants (`convert.py`), and its contract with
the engine."""

from medjax.models.family import Family, remat_only
from medjax.models.sam.model import *  # noqa: F401,F403 (the package is the model's namespace)
from medjax.models.sam.model import FAMILY, SamImageEncoder, SamViTConfig, layers, lora_targets

FAMILIES = [Family(FAMILY, SamViTConfig, SamImageEncoder, layers=layers, stem="patch_embed/kernel",
                   lora_targets=lora_targets,
                   execution=remat_only(FAMILY, "windowed and global blocks alternate"),
                   gradcam_layer=lambda c: f"blocks_{c.depth - 1}")]  # the trunk tokens the features pool (NHWC)
