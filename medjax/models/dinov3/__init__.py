"""DINOv3 ViT (RoPE, registers, LayerScale, plain or gated MLP; `model.py`), its converter key tables for the
transformers and the official facebookresearch/dinov3 namings and its variants (`convert.py`), and its contract with
the engine. The distilled ConvNeXts are the `dinov3_convnext` family."""

from medjax.models.dinov3.model import *  # noqa: F401,F403 (the package is the model's namespace)
from medjax.models.dinov3.model import FAMILY, DINOv3Config, DINOv3ViT, layers, lora_targets, max_taps, taps
from medjax.models.family import Family, remat_only


def rollout_tokens(config: DINOv3Config):
    """[CLS, registers, patches] attend globally in every block; the linear head reads the CLS token."""
    return 1 + config.num_registers, True


FAMILIES = [Family(FAMILY, DINOv3Config, DINOv3ViT, layers=layers, stem="patch_embed/kernel",
                   lora_targets=lora_targets, max_taps=max_taps, taps=taps, rollout_tokens=rollout_tokens,
                   execution=remat_only(FAMILY, "RoPE tables ride along every block call"))]
