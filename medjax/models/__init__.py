"""Backbone registry: family name -> (config class, Flax module)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from medjax.models import vit

# family -> (config class, module class); every family of the ViT body shares one implementation.
BACKBONES = {family: (vit.ViTConfig, vit.VisionTransformer) for family in vit.FAMILIES}


def config_from_dict(family: str, d: dict):
    if family not in BACKBONES:
        raise ValueError(f"unknown backbone family {family!r}; known: {sorted(BACKBONES)}")
    return BACKBONES[family][0].from_dict(d)


def build_backbone(config, dtype=None):
    return BACKBONES[config.family][1](config, dtype=dtype)


def param_shapes(config) -> dict:
    """Parameter shapes of a backbone without allocating them (jax.eval_shape)."""
    model = build_backbone(config)
    h, w = config.image_size
    dummy = jax.ShapeDtypeStruct((1, h, w, config.in_chans), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), dummy)["params"]


def count_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))
