"""The backbone registry, the only one: one package per family under `medjax/models/`, listed once in `PACKAGES`.

Each package holds its Flax module (`model.py`), its converter key tables and variants (`convert.py`: `CONVERTERS`,
`VARIANTS`) and, in `__init__.py`, `FAMILIES`: one `medjax.models.family.Family` per `config.family` value it serves
(the contract the engine asks for block order, embeddings, LoRA targets, feature taps and the stem). The registry
attaches each family's converter and variants to its `Family`; `VARIANTS` maps every variant name to its family.
"""

from __future__ import annotations

import dataclasses
import importlib
import math

import jax
import jax.numpy as jnp

from medjax import pretrained
from medjax.models.family import Family
from medjax.tree import flatten_variables

# A new family is a folder and one entry here.
PACKAGES = ("vit", "hiera", "vmamba", "resnet", "densenet", "vgg", "sam", "dinov3", "dinov3_convnext", "siglip")



def _registry() -> dict[str, Family]:
    families = {}
    for pkg in PACKAGES:
        convert = importlib.import_module(f"medjax.models.{pkg}.convert")
        converters = {c.name: c for c in convert.CONVERTERS}
        for f in importlib.import_module(f"medjax.models.{pkg}").FAMILIES:
            variants = {name: kwargs for name, (family, kwargs) in convert.VARIANTS.items() if family == f.name}
            families[f.name] = dataclasses.replace(f, converter=converters.get(f.name), variants=variants)
    return families


FAMILIES: dict[str, Family] = _registry()
# every variant name (`dinov2_vitb14`, `resnet50`, ...) -> (family name, constructor kwargs)
VARIANTS: dict[str, tuple[str, dict]] = {v: (f.name, kw) for f in FAMILIES.values() for v, kw in f.variants.items()}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown backbone family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def config_from_dict(name: str, d: dict):
    return family(name).config.from_dict(d)


def build_backbone(config, dtype=None, name=None):
    return family(config.family).module(config, dtype=dtype, name=name)


def variable_shapes(config) -> dict:
    """Every variable collection of a backbone ({'params': ..., 'batch_stats': ...}), as shapes (jax.eval_shape)."""
    model = build_backbone(config)
    h, w = config.image_size
    dummy = jax.ShapeDtypeStruct((1, h, w, config.in_chans), jnp.float32)
    return dict(jax.eval_shape(lambda x: model.init(jax.random.key(0), x), dummy))


def param_shapes(config) -> dict:
    """Parameter shapes of a backbone without allocating them."""
    return variable_shapes(config)["params"]


def count_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def _architecture(family: str, arch, meta_path: str):
    """A converted folder's metadata read by its family: (config, expected variable shapes), checked against the
    family's declared fields and ranges before anything is allocated."""
    if family not in FAMILIES:
        raise pretrained.PretrainedError(f"{meta_path}: family {family!r} is not one of {', '.join(sorted(FAMILIES))}")
    pretrained.check_architecture(meta_path, FAMILIES[family].config, arch)
    try:
        config = config_from_dict(family, arch)
    except (KeyError, TypeError, ValueError) as e:
        raise pretrained.PretrainedError(f"{meta_path}: cannot read the architecture: {e}") from e
    return config, flatten_variables(variable_shapes(config))


def load_pretrained(params_dir: str):
    """(config, variables, metadata) of a converted backbone folder (`medjax.pretrained`), verified."""
    return pretrained.read(params_dir, _architecture)
