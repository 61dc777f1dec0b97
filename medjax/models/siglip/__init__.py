"""The SigLIP family: transformers' `SiglipVisionModel` (SigLIP, the SigLIP 2 fixed-resolution checkpoints, MedSigLIP)
as one Flax module (`model.py`), its converter key tables and variants (`convert.py`), and its contract with the engine.

SigLIP has no CLS token. The linear head and the protocols' "CLS" tap read the attention-pooling head's output
(`pooler_output`, the tower's image embedding; the token mean when a checkpoint has no head); `patch_mean` is the mean
of the post-layernormed tokens, which the attention head also reads. The protocols get one tap (the final feature).
No attention rollout: the pooled feature comes from the head's probe cross-attending to the tokens, which the rollout
does not follow (as for CoCa's pooler); Grad-CAM reads the final tokens as a patch grid (`token_grid`)."""

from medjax.models.family import Family
from medjax.models.siglip.model import *  # noqa: F401,F403 (the package is the model's namespace)
from medjax.models.siglip.model import FAMILY, SiglipConfig, SiglipVisionTower, layers, lora_targets

FAMILIES = [Family(FAMILY, SiglipConfig, SiglipVisionTower, layers=layers, stem="patch_embed/kernel",
                   lora_targets=lora_targets, rollout_tokens=None,
                   gradcam_layer=lambda c: "token_grid")]
