"""DINOv3 ViT (RoPE, registers, LayerScale, plain or gated MLP; `model.py`), its converter key tables for the
transformers and the official facebookresearch/dinov3 namings and its variants (`convert.py`), and its contract with
the engine. The distilled ConvNeXts are the `dinov3_convnext` family."""

import dataclasses

from medjax.errors import UserError
from medjax.models.dinov3.model import *  # noqa: F401,F403 (the package is the model's namespace)
from medjax.models.dinov3.model import FAMILY, DINOv3Config, DINOv3ViT, layers, lora_targets, max_taps, taps
from medjax.models.family import Family


def execution(config: DINOv3Config, variables, remat: bool, scan: bool):
    """`model.remat` recomputes each block in the backward pass; the blocks are never scanned (RoPE tables ride
    along every block call, and the converted layout stays as is)."""
    if scan:
        raise UserError("model.scan is not an option of the dinov3 family (model.remat is)")
    return dataclasses.replace(config, remat=remat), variables


def rollout_tokens(config: DINOv3Config):
    """[CLS, registers, patches] attend globally in every block; the linear head reads the CLS token."""
    return 1 + config.num_registers, True


FAMILIES = [Family(FAMILY, DINOv3Config, DINOv3ViT, layers=layers, stem="patch_embed/kernel",
                   lora_targets=lora_targets, max_taps=max_taps, taps=taps, rollout_tokens=rollout_tokens,
                   execution=execution)]
