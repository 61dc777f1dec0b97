"""VMamba (vmambav2, SS2D v05_noz, `model.py`), its converter key tables and variants (`convert.py`), and its contract
with the engine."""

from medjax.models.family import Family
from medjax.models.vmamba.model import *  # noqa: F401,F403 (the package is the model's namespace)
from medjax.models.vmamba.model import VMamba, VMambaConfig, layers, lora_targets

FAMILIES = [Family("vmamba", VMambaConfig, VMamba, layers=layers, stem="patch_embed/conv1/kernel",
                   lora_targets=lora_targets,
                   gradcam_layer=lambda c: f"layers_{len(c.depths) - 1}")]  # the last stage, before the final norm
