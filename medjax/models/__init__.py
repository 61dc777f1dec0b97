"""Backbone registry: family name -> (config class, Flax module).

Each backbone module exports BACKBONES = {family: (ConfigClass, ModuleClass)}. A config class is a frozen dataclass
with `family`, `in_chans`, an `image_size` property (a valid (H, W) input), `to_dict()` and `from_dict()`. A module
is built as `ModuleClass(config, dtype=None)`, takes NHWC images and returns a dict of named outputs that includes
`linear_head_input` and `attention_head_input`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from medjax.models import hiera, vit, vmamba

BACKBONES = {family: spec for module in (vit, hiera, vmamba) for family, spec in module.BACKBONES.items()}


def config_from_dict(family: str, d: dict):
    if family not in BACKBONES:
        raise ValueError(f"unknown backbone family {family!r}; known: {sorted(BACKBONES)}")
    return BACKBONES[family][0].from_dict(d)


def build_backbone(config, dtype=None, name=None):
    return BACKBONES[config.family][1](config, dtype=dtype, name=name)


def param_shapes(config) -> dict:
    """Parameter shapes of a backbone without allocating them (jax.eval_shape)."""
    model = build_backbone(config)
    h, w = config.image_size
    dummy = jax.ShapeDtypeStruct((1, h, w, config.in_chans), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), dummy)["params"]


def count_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))
