"""The ViT family: one Vision Transformer body (`model.py`) for DINOv2, MAE, DeiT, AIMv2 and the open_clip CLIP and
CoCa towers, their converter key tables and variants (`convert.py`), and the contract each `config.family` value
states to the engine."""

import dataclasses

from medjax.models.family import Family
from medjax.models.vit.model import *  # noqa: F401,F403 (the package is the model's namespace)
from medjax.models.vit.model import (
    NAMES,
    VisionTransformer,
    ViTConfig,
    layers,
    lora_targets,
    max_taps,
    stack_blocks,
    taps,
    unstack_blocks,
)


def execution(config: ViTConfig, variables, remat: bool, scan: bool):
    """`model.remat` / `model.scan`: how the blocks run. A scanned model takes the converted (unrolled) blocks
    stacked; an unrolled one takes a scanned model's blocks unstacked."""
    config = dataclasses.replace(config, remat=remat, scan=scan)
    if variables is not None and scan != ("blocks" in variables["params"]):
        layout = stack_blocks if scan else unstack_blocks
        variables = {**variables, "params": layout(variables["params"])}
    return config, variables


def rollout_tokens(config: ViTConfig):
    """[CLS, registers, patches] attend globally in every block. The linear head reads the CLS token, except MAE's
    and AIMv2's (the mean of the patch tokens); CoCa pools by cross-attention (no rollout)."""
    if config.attn_pool_queries:
        return None
    cls_pooled = config.class_token and config.family not in ("mae", "aimv2")
    return int(config.class_token) + config.num_registers, cls_pooled


FAMILIES = [Family(name, ViTConfig, VisionTransformer, layers=layers, stem="patch_embed/kernel",
                   lora_targets=lora_targets, max_taps=max_taps, taps=taps, rollout_tokens=rollout_tokens,
                   execution=execution, scan=True)
            for name in NAMES]
