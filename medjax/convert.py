"""Checkpoint conversion (`python -m converters CHECKPOINT OUTPUT_DIR --model NAME`): official PyTorch /
transformers / open_clip files, and fine-tuned models with their trained head, -> medjax Flax parameters.

Each backbone family's package declares its key tables, formats, config reader and variants in `convert.py`
(`medjax/models/vit/convert.py`, ...), beside its model; `convert` is the same for all of them.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from medjax import finetuned, models, pretrained
from medjax.conversion import CheckpointError, ConversionError, apply_rules, read_state_dict, resolve_checkpoint, sha256
from medjax.models import VARIANTS
from medjax.tree import flatten_variables

CONVERTER_VERSION = "1"
# family name -> its medjax.conversion.Converter (key tables, formats, config reader), from the one registry
CONVERTERS = {f.name: f.converter for f in models.FAMILIES.values() if f.converter is not None}

__all__ = ["convert", "CheckpointError", "ConversionError", "CONVERTERS", "CONVERTER_VERSION"]


def _resolve_model(model: str, config: dict | None) -> tuple[str, dict | None]:
    if model in VARIANTS:
        family, kwargs = VARIANTS[model]
        return family, {**kwargs, **(config or {})}
    if model in CONVERTERS:
        return model, config
    raise CheckpointError(f"unknown --model {model!r}; known variants: {', '.join(sorted(VARIANTS))}; "
                          f"or a family name ({', '.join(sorted(CONVERTERS))}) with --config")


def _detect_format(family, keys, checkpoint: str):
    for fmt in family.formats:
        if fmt.matches(keys):
            return fmt
    looks_like = [f.name for f in CONVERTERS.values() if f is not family and any(x.matches(keys) for x in f.formats)]
    hint = f"; it looks like a {looks_like[0]} checkpoint" if looks_like else ""
    raise CheckpointError(f"{checkpoint} is not a {family.name} checkpoint in any supported format "
                          f"({', '.join(f.name for f in family.formats)}){hint}. First keys: "
                          f"{', '.join(sorted(keys)[:8])}")


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: config file not found") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object of constructor arguments")
    return cfg


def _fit_stem_channels(config, renamed: dict, rules) -> object:
    """A fine-tuned grayscale model's 1-channel stem (the study's CheXpert / CBIS-DDSM runs): the architecture takes
    one input channel when the checkpoint's stem convolution does."""
    stem = models.family(config.family).stem
    if not stem or getattr(config, "in_chans", None) != 3:
        return config
    for rule in rules:
        if rule.target != stem:
            continue
        pattern = rule.source_regex()
        for key, value in renamed.items():
            if pattern.fullmatch(key) and np.ndim(value) == 4 and np.shape(value)[1] == 1:
                return dataclasses.replace(config, in_chans=1)
    return config


def _pooled_width(config) -> int:
    """The width of the backbone's `linear_head_input` (what a trained linear head takes)."""
    model = models.build_backbone(config)
    h, w = config.image_size
    dummy = jax.ShapeDtypeStruct((1, h, w, config.in_chans), jnp.float32)
    out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0], dummy)
    return int(out["linear_head_input"].shape[-1])


def convert(checkpoint: str, output_dir: str, model: str, config_path: str | None = None, **options) -> dict:
    """Convert `checkpoint` for `model` (a variant or family name) into `output_dir`; returns the metadata.

    options: ema=True takes a checkpoint's `model_ema` weights; linear_head=FILE adds a classifier head file the
    family knows (DINOv2's hub `*_linear[4]_head.pth`: its family module's `attach_linear_head`); family-specific
    choices such as dinov2_resize='auto'|'official'|'transformers' reach the family's `adjust`.
    """
    family_name, kwargs = _resolve_model(model, _read_json(config_path) if config_path else None)
    family = CONVERTERS[family_name]
    extras: dict = {}
    state = read_state_dict(checkpoint, ema=bool(options.get("ema")), extras=extras)
    state, head = finetuned.split_head(state, family_name, checkpoint)
    fmt = _detect_format(family, state.keys(), checkpoint)
    if kwargs is None:
        if not fmt.hf:
            raise CheckpointError(f"--model {family_name} needs --config CONFIG.json (the upstream constructor's "
                                  f"keyword arguments) or a known variant name: {', '.join(sorted(VARIANTS))}")
        folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))
        config_path = os.path.join(folder, "config.json")  # as from_pretrained reads it
        kwargs = _read_json(config_path)
    config = family.parse_config(kwargs)
    if family.adjust:
        config = family.adjust(config, fmt, kwargs, options)

    renamed, outside = {}, 0
    for key, value in state.items():
        name = fmt.normalise(key)
        if name is None:
            outside += 1
        else:
            renamed[name] = value
    if not renamed:
        raise CheckpointError(f"{checkpoint}: no keys under {fmt.select_prefix!r}")
    rules, head_source = fmt.rules, None
    config = _fit_stem_channels(config, renamed, rules)
    if head is not None and head["kind"] == "lc":  # transformers' classifier = the hub linear head, one layer
        attach = family.attach_classifier_head
        if attach is None or options.get("linear_head"):
            raise CheckpointError(f"{checkpoint}: a transformers classifier ({head['keys']}) on a {family_name} "
                                  "backbone is not read" + (" together with --linear-head" if attach else ""))
        config, head_state, head_rules = attach(config, head["weight"], head["bias"])
        renamed.update(head_state)
        rules = list(rules) + list(head_rules)
    if options.get("linear_head"):
        attach = family.attach_linear_head
        if attach is None:
            raise CheckpointError(f"--linear-head: the {family_name} family has no classifier heads to attach "
                                  "(DINOv2's hub linear heads go with a dinov2 backbone)")
        config, head_state, head_rules, head_source = attach(config, options["linear_head"])
        renamed.update(head_state)
        rules = list(rules) + list(head_rules)
    expected = {k: tuple(v.shape) for k, v in flatten_variables(models.variable_shapes(config)).items()}
    notes = [f"(format {fmt.name}; ignorable keys: {family.ignored})"]
    variables = apply_rules(renamed, rules, fmt.ignore, expected, checkpoint, model, fmt.hooks, notes)
    files = resolve_checkpoint(checkpoint)
    metadata = {
        "family": family_name,
        "model": model,
        "architecture": config.to_dict(),
        "source": {"file": os.path.basename(os.path.normpath(checkpoint)), "sha256": ",".join(map(sha256, files)),
                   "format": fmt.name, "config": os.path.basename(config_path) if config_path else None,
                   "ignored_keys_outside_prefix": outside,
                   **({"linear_head": head_source} if head_source else {})},
        "converter_version": CONVERTER_VERSION,
        "num_params": models.count_params(variables["params"]),
    }
    if head is not None:
        metadata[finetuned.TRAINED_HEAD_KEY] = {"kind": head["kind"], "layout": head["layout"], "keys": head["keys"],
                                                "num_classes": int(head["weight"].shape[0])}
    try:
        if head is not None and head["kind"] == "linear":
            expected_in = _pooled_width(config)
            if head["weight"].shape[1] != expected_in:
                raise CheckpointError(f"{checkpoint}: the trained head {head['keys']} takes "
                                      f"{head['weight'].shape[1]} features, the backbone's pooled feature has "
                                      f"{expected_in}")
            facts, tensors = finetuned.export_facts(family_name, head, config.in_chans,
                                                    finetuned.study_facts(extras), checkpoint)
            metadata[finetuned.EXPORT_KEY] = facts
            finetuned.write_head(output_dir, tensors)
        pretrained.save(output_dir, variables, metadata)
    except pretrained.PretrainedError as e:
        raise CheckpointError(str(e)) from e
    return metadata
