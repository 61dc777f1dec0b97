"""A backbone with a classification head (SPEC section 4): the linear head, or the DeiT-B "Y-model" attention head."""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from medjax import finetuned, models, pretrained
from medjax.errors import UserError
from medjax.models.layers import layer_norm
from medjax.models.vit import ViTConfig, apply_blocks, interpolate_pos_embed
from medjax.weights import fetch as weights


class ModelConfigError(UserError):
    """The model section of a config does not fit the converted weights or the data."""


def deit_body_config(width=768, depth=12, num_heads=12, grid=14, mlp_ratio=4) -> ViTConfig:
    """The supervised DeiT-B body of the attention head; its 14x14 pos-embed follows the token grid at run time."""
    return ViTConfig(family="deit", width=width, depth=depth, num_heads=num_heads, patch_size=16, pos_grid=(grid, grid),
                     mlp_hidden=width * mlp_ratio, norm_eps=1e-6, pos_resize="size")


class AttentionHead(nn.Module):
    """tokens -> Dense(D_f, 768) -> LayerNorm(1e-5) -> DeiT body (CLS prepended, pos-embed bicubic-resized to the
    token grid, differentiably) -> final norm -> CLS -> Dense(n_classes)."""

    deit: ViTConfig
    num_classes: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, tokens):
        c = self.deit
        batch, n, _ = tokens.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"the attention head needs a square token grid, got {n} tokens")
        x = nn.Dense(c.width, dtype=self.dtype, name="in_proj")(tokens)
        x = layer_norm(1e-5, "in_norm", self.dtype)(x)
        cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, c.width))
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, 1 + c.pos_grid[0] * c.pos_grid[1], c.width))
        pos = interpolate_pos_embed(c, pos, (side, side), (side * c.patch_size, side * c.patch_size))
        cls = jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, c.width))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype)
        x = apply_blocks(c, x, self.dtype)
        x = layer_norm(c.norm_eps, "norm", self.dtype)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x[:, 0])


class MlpHead(nn.Module):
    """The glioma study's head: feature -> Dense(hidden) -> ReLU -> Dense(classes). The feature is the 1000 ImageNet
    logits of a DINOv2 `_lc` backbone (`dinov2_vit{s,b,l}14_lc` = the backbone converted with --linear-head), as the
    study runs it, else the family's pooled feature."""

    hidden: int
    num_classes: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc2")(x)


class Classifier(nn.Module):
    backbone: object  # a backbone config (medjax.models)
    num_classes: int
    head: str = "linear"  # "linear" | "attention" | "mlp"
    deit: ViTConfig | None = None
    dtype: jnp.dtype | None = None
    mlp_hidden: int = 256

    @nn.compact
    def __call__(self, images, train: bool = False):
        volume = images.shape[:2] if images.ndim == 5 else None  # (B, S, H, W, C): the slices of B volumes
        if volume is not None:
            images = images.reshape((volume[0] * volume[1],) + images.shape[2:])
        features = models.build_backbone(self.backbone, self.dtype, name="backbone")(images, train=train)
        if self.head == "linear":
            logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(features["linear_head_input"])
        elif self.head == "mlp":  # on a DINOv2 `_lc` backbone (converted with --linear-head): its ImageNet logits
            inputs = features["lc_logits"] if "lc_logits" in features else features["linear_head_input"]
            logits = MlpHead(self.mlp_hidden, self.num_classes, self.dtype, name="head")(inputs)
        elif self.head == "attention":
            logits = AttentionHead(self.deit, self.num_classes, self.dtype, name="head")(
                features["attention_head_input"])
        else:
            raise ModelConfigError(f"model.head must be 'linear', 'mlp' or 'attention', got {self.head!r}")
        logits = logits.astype(jnp.float32)
        if volume is not None:  # a volume's logits: the mean of its slices' logits
            logits = logits.reshape(volume + logits.shape[1:]).mean(axis=1)
        return logits


# ------------------------------------------------------------------------------------------------ building


def reduce_stem_channels(backbone_params: dict, mode: str, stem: str) -> dict:
    """Grayscale datasets: the RGB stem convolution (the family's `stem` path) becomes 1-channel, by the red filter
    (`red`, the reference) or the sum over RGB (`sum`)."""
    flat = pretrained.flatten(backbone_params)
    if stem not in flat or np.ndim(flat[stem]) != 4 or np.shape(flat[stem])[2] != 3:
        raise ModelConfigError(f"the family's stem {stem!r} is not an RGB convolution kernel in these parameters")
    kernel = np.asarray(flat[stem])
    if mode == "red":
        flat[stem] = kernel[:, :, 0:1]
    elif mode == "sum":
        flat[stem] = kernel.sum(axis=2, keepdims=True)
    else:
        raise ModelConfigError(f"model.grayscale must be 'red' or 'sum', got {mode!r}")
    return pretrained.unflatten(flat)


def _read_converted(path: str, abstract: bool):
    """(config, variables, metadata) of a converted folder; abstract: (config, None, metadata), no weights read."""
    if not abstract:
        return models.load_pretrained(path)
    meta = pretrained.read_metadata(path)
    try:
        return models.config_from_dict(meta["family"], meta["architecture"]), None, meta
    except (KeyError, TypeError, ValueError) as e:
        raise pretrained.PretrainedError(f"{path}/{pretrained.METADATA_FILE}: cannot read the architecture: {e}") from e


def load_backbone(model_cfg, channels: int, abstract: bool = False):
    """(backbone config, variables or None) from `model.pretrained` (a converted folder) or `model.architecture`.
    A converted folder must hold the family the config names (when it names one). abstract=True reads a converted
    folder's metadata only (variables None)."""
    if model_cfg.pretrained:
        path = weights.resolve(model_cfg.pretrained)  # a registry name: its cached folder, fetched on first use
        if not os.path.exists(os.path.join(path, pretrained.METADATA_FILE)):
            raise ModelConfigError(
                f"model.pretrained={path!r} is not a converted backbone. Convert the official checkpoint first: "
                f"`python -m converters CHECKPOINT {path} --model {_variant_hint(model_cfg.family)}` "
                "(docs/converting.md)")
        config, variables, meta = _read_converted(path, abstract)
        if model_cfg.family and meta["family"] != model_cfg.family:
            raise ModelConfigError(
                f"model.family={model_cfg.family!r} but model.pretrained={path!r} holds a {meta['family']!r} backbone "
                f"(converted from {meta.get('source', {}).get('file')}); set model.family={meta['family']!r} or point "
                "model.pretrained at a converted " + model_cfg.family + " folder")
    elif model_cfg.architecture:
        config, variables = models.config_from_dict(model_cfg.family, dict(model_cfg.architecture)), None
    else:
        raise ModelConfigError("set model.pretrained (a converted backbone folder) or model.architecture (random init)")
    if channels != config.in_chans:
        if channels != 1 or config.in_chans != 3:
            raise ModelConfigError(f"the data has {channels} channels, the backbone expects {config.in_chans}")
        config = dataclasses.replace(config, in_chans=1)
        if variables is not None:
            variables = {**variables, "params": reduce_stem_channels(variables["params"], model_cfg.grayscale,
                                                                     models.family(config.family).stem)}
    return _execution_options(model_cfg, config, variables)


def _variant_hint(family: str) -> str:
    """The converter's --model value a config of this family expects (its variant names, or the family name)."""
    names = sorted(v for v, (f, _) in models.VARIANTS.items() if f == family)
    return "|".join(names[:4]) + ("|..." if len(names) > 4 else "") if names else (family or "NAME")


def _execution_options(model_cfg, config, variables):
    """`model.remat` / `model.scan` set how the blocks run, for the families whose contract offers it."""
    remat, scan = bool(model_cfg.remat), bool(model_cfg.scan)
    family = models.family(config.family)
    if family.execution is None:
        if remat or scan:
            raise ModelConfigError(f"model.remat / model.scan are not options of the {config.family!r} family")
        return config, variables
    return family.execution(config, variables, remat, scan)


def build_classifier(model_cfg, num_classes: int, channels: int, image_size: int, rng, dtype=jnp.float32,
                     abstract: bool = False):
    """(model, variables): the classifier with the pretrained backbone (if any) and the DeiT body (if given) in
    place. `variables` holds every collection of the model ({'params': ..., 'batch_stats': ...}).
    abstract=True: the same model, its variables as jax.ShapeDtypeStructs; converted folders are read for their
    metadata (the architecture) only, no weights are read and nothing is allocated (`python -m medjax.plan`)."""
    backbone_cfg, backbone_vars = load_backbone(model_cfg, channels, abstract=abstract)
    deit = None
    if model_cfg.head == "attention":
        a = model_cfg.attention_head
        deit_params = None
        if a.deit_params:
            deit, deit_vars = _read_converted(a.deit_params, abstract)[:2]
            deit = dataclasses.replace(deit, pos_resize="size")
            deit_params = None if deit_vars is None else deit_vars["params"]
        else:
            deit = deit_body_config(a.width, a.depth, a.num_heads, a.grid)
    model = Classifier(backbone_cfg, num_classes, model_cfg.head, deit, dtype=dtype, mlp_hidden=model_cfg.mlp_hidden)
    dummy = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
    if abstract:
        variables = jax.eval_shape(model.init, rng, dummy)
        return model, {c: dict(v) for c, v in variables.items()}
    variables = jax.tree_util.tree_map(np.asarray, dict(jax.jit(model.init)(rng, dummy)))
    variables = {c: dict(v) for c, v in variables.items()}
    if backbone_vars is not None:
        for collection, tree in variables.items():
            if "backbone" in tree:
                tree["backbone"] = _replace(tree["backbone"], backbone_vars.get(collection, {}),
                                            "backbone" if collection == "params" else f"backbone {collection}")
    if model_cfg.pretrained:
        _keep_trained_head(model_cfg, variables, num_classes)
    if deit is not None and model_cfg.attention_head.deit_params:
        head = variables["params"]["head"]
        body = {k: v for k, v in deit_params.items() if k != "patch_embed"}  # the Y-model drops DeiT's patch embed
        variables["params"]["head"] = head | _replace({k: head[k] for k in body}, body, "head")
    return model, variables


def _keep_trained_head(model_cfg, variables: dict, num_classes: int) -> None:
    """A pretrained folder with a fine-tuned head (a converted fine-tuned model, a `medjax.export` folder) starts
    the run with that head when the run's head kind and class count are the head's; otherwise the head starts
    fresh, as for any backbone."""
    path = weights.resolve(model_cfg.pretrained)
    found = finetuned.read_head(path, pretrained.read_metadata(path))
    if found is None:
        return
    facts, tensors = found
    head = facts.get("head", {})
    if head.get("kind") != model_cfg.head or head.get("num_classes") != num_classes:
        return
    for collection, tree in pretrained.unflatten_variables(tensors).items():
        if tree and collection in variables and "head" in variables[collection]:
            variables[collection]["head"] = _replace(variables[collection]["head"], tree, "trained head")


def _replace(init: dict, loaded: dict, where: str) -> dict:
    a, b = pretrained.flatten(init), pretrained.flatten(loaded)
    bad = sorted(set(a) ^ set(b)) + [k for k in a if k in b and np.shape(a[k]) != np.shape(b[k])]
    if bad:
        raise ModelConfigError(f"pretrained {where} variables do not fit the model: {bad[:20]}")
    return pretrained.unflatten({k: np.asarray(b[k], np.float32) for k in a})
