"""The family contract: what the engine needs to know about a backbone family, stated once in the family's package.

A family is one folder `medjax/models/<name>/` holding its Flax module (`model.py`), its converter key tables and
variants (`convert.py`) and, in `__init__.py`, one `Family` per `config.family` value it serves. The registry
(`medjax/models/__init__.py`) lists the folders. Nothing else in medjax looks at a family's parameter names: freezing,
layer-wise lr decay, LoRA, BitFit, the grayscale stem, the protocols' feature taps, the grid and the explanations
(attention rollout, Grad-CAM) ask the `Family`.

The module contract (stated in code by `medjax.models.base.Backbone`, which the families' modules subclass):
- built as `module(config, dtype=None, name=None)`; called as `module(images_nhwc, train=False)`;
- returns a dict of named outputs (the upstream names, for parity) that includes `linear_head_input` (B, D), the pooled
  feature of the linear head, and `attention_head_input` (B, N, D), the tokens of the attention head;
- its variables are `params` plus any other collection it declares (`batch_stats` for BatchNorm); a module with
  dropout draws from the `dropout` rng stream when `train` is True.

Paths are `/`-joined Flax paths relative to the backbone (`blocks_3/attn/qkv/kernel`); rules over the classifier's
parameters see them under `backbone/`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax.numpy as jnp

from medjax.errors import UserError

# the default layer patterns of a family that has no blocks: everything is "after the blocks"
_NO_LAYERS: Callable[[Any], list[str]] = lambda config: []  # noqa: E731


@dataclasses.dataclass(frozen=True)
class Family:
    """One `config.family` value: its config class, its module and the facts the engine asks for."""

    name: str
    config: type  # a frozen dataclass with `family`, `in_chans`, an `image_size` property, to_dict / from_dict
    module: type  # the Flax module (see the module contract above)
    # Network order of the parameters: regexes (over backbone-relative paths, `re.match`) of layer 0 (the
    # embeddings: stem, class token, position embeddings, ...) and of blocks 1..L in the order the input meets them,
    # across stages. A parameter matching none of them sits after the blocks (final norm, neck, projection): L + 1.
    # Partial freezing ("from block k") and layer-wise lr decay are computed from this list.
    layers: Callable[[Any], list[str]] = _NO_LAYERS
    stem: str = ""  # path of the RGB input convolution kernel, reduced to one channel for grayscale data
    # LoRA: regexes of the 2-d Dense kernels that get adapters (the reference's qkv and MLP kernels of the blocks).
    lora_targets: Callable[[Any], list[str]] = lambda config: []  # noqa: E731
    # The protocols' feature taps: how many "last blocks" a backbone offers (1: only its final feature), and a
    # builder (config, n, dtype) -> fn(variables, images) -> {'cls': (B, n, D), 'patch_mean': (B, D)}. None: the
    # generic taps, n = 1 with `linear_head_input` as the "CLS" and the mean of `attention_head_input` tokens.
    max_taps: Callable[[Any], int] = lambda config: 1  # noqa: E731
    taps: Callable | None = None
    # The radiology study's linear probe reads the pooled feature alone (one "block", no patch mean): a CNN's pooled
    # feature already is the global mean of its last feature map.
    probe_pooled_only: bool = False
    # How the blocks run (`model.remat`, `model.scan`): (config, variables or None, remat, scan) -> (config,
    # variables), e.g. the ViT family stacks its converted blocks for a scanned model. None: the family has no such
    # options, and asking for one is an error. `remat_only(name)` for a family whose blocks differ from one another
    # (no scan).
    execution: Callable | None = None
    scan: bool = False  # whether `execution` offers model.scan besides model.remat (medjax.plan's suggestions ask)
    # Explanations (`medjax.explain`). Attention rollout: (config) -> (first_patch, cls_pooled), or None for a
    # configuration without it. Offered by a family whose blocks attend globally over its token sequence with
    # `layers.Attention` and whose `attention_head_input` is `tokens[first_patch:]`: first_patch is the index of the
    # first patch token (after CLS and registers); cls_pooled says whether `linear_head_input` comes from token 0 (the
    # rollout then reads the CLS row; otherwise the mean of the patch rows). None: no rollout (windowed attention,
    # convolutions).
    rollout_tokens: Callable[[Any], tuple[int, bool] | None] | None = None
    # Grad-CAM: (config) -> the backbone-relative path of the module whose output is the last feature map the
    # features are pooled from, NHWC (B, h, w, C); `path#k` takes element k of a module that returns a list of maps.
    # None: no Grad-CAM (occlusion still works for every family).
    gradcam_layer: Callable[[Any], str] | None = None
    # Conversion (`python -m converters`, `medjax.convert`): the family's key tables, formats and config reader
    # (`medjax.conversion.Converter`, declared in the package's `convert.py`), and its variants by name
    # ({name: constructor kwargs}). Attached by the registry (`medjax.models`).
    converter: Any = None
    variants: dict = dataclasses.field(default_factory=dict)

    def layer_patterns(self, config) -> list[str]:
        """[embeddings, block 1, ..., block L] regexes; raises when this configuration has no per-block layout."""
        return list(self.layers(config))

    def layer_of(self, config, path: str, patterns: list[str] | None = None) -> int:
        """The network-order depth of a backbone parameter: 0 embeddings, i for block i (1-based), L + 1 after."""
        patterns = self.layer_patterns(config) if patterns is None else patterns
        for depth, pattern in enumerate(patterns):
            if re.match(pattern, path):
                return depth
        return len(patterns)

    def explain_method(self, config) -> str:
        """`python -m medjax.explain`'s default: attention rollout, else Grad-CAM, else occlusion."""
        if self.rollout_tokens is not None and self.rollout_tokens(config) is not None:
            return "attention"
        return "gradcam" if self.gradcam_layer is not None else "occlusion"

    def feature_fn(self, config, num_blocks: int, dtype=None):
        """fn(variables, images) -> {'cls': (B, n, D), 'patch_mean': (B, D)} for the frozen-feature protocols."""
        available = self.max_taps(config)
        if not 1 <= num_blocks <= available:
            raise ValueError(f"{config.family}: {num_blocks} last blocks requested, this backbone offers "
                             f"1..{available}")
        if self.taps is not None and available > 1:
            return self.taps(config, num_blocks, dtype)
        return generic_taps(self.module(config, dtype))


def staged_layers(embeddings: str, depths, block: str, downsample: str) -> list[str]:
    """`Family.layers` of a network in stages: the embeddings' pattern, then every block in network order across the
    stages (`block` formatted with s, the stage, and j, the block in it); the downsampling that feeds stage s > 0
    (`downsample` formatted with s and previous = s - 1) goes with the block it feeds, the stage's first."""
    out = [embeddings]
    for s, depth in enumerate(depths):
        for j in range(depth):
            here = block.format(s=s, j=j)
            out.append(f"({downsample.format(s=s, previous=s - 1)}|{here})" if j == 0 and s > 0 else here)
    return out


def generic_taps(model):
    """n = 1: the linear head's pooled feature as the "CLS" and the mean of the attention head's tokens."""
    def taps(variables, images):
        out = model.apply(variables, images)
        tokens = out["attention_head_input"]
        pooled = tokens.mean(axis=tuple(range(1, tokens.ndim - 1))) if tokens.ndim > 2 else tokens
        return {"cls": out["linear_head_input"][:, None].astype(jnp.float32), "patch_mean": pooled.astype(jnp.float32)}
    return taps


def remat_only(name: str, why: str) -> Callable:
    """The `execution` of a family whose config has a `remat` field and whose blocks cannot be scanned (`why`)."""

    def execution(config, variables, remat: bool, scan: bool):
        if scan:
            raise UserError(f"model.scan is not an option of the {name} family ({why}); model.remat is")
        return dataclasses.replace(config, remat=remat), variables

    return execution
