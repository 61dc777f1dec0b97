"""Checkpoint conversion: official PyTorch / transformers / open_clip files -> medjax Flax parameters.

    python -m converters CHECKPOINT OUTPUT_DIR --model NAME [--config CONFIG.json]
"""

from __future__ import annotations

import json
import os

from converters import vit
from converters.core import CheckpointError, ConversionError, apply_rules, read_state_dict, sha256
from medjax import models, pretrained
from medjax.pretrained import flatten

CONVERTER_VERSION = "1"
FAMILY_FORMATS = vit.FAMILY_FORMATS
VARIANTS = vit.VARIANTS

__all__ = ["convert", "CheckpointError", "ConversionError", "VARIANTS", "FAMILY_FORMATS"]


def _resolve_model(model: str, config: dict | None) -> tuple[str, dict | None]:
    if model in VARIANTS:
        family, kwargs = VARIANTS[model]
        return family, {**kwargs, **(config or {})}
    if model in FAMILY_FORMATS:
        return model, config
    raise CheckpointError(f"unknown --model {model!r}; known variants: {', '.join(sorted(VARIANTS))}; "
                          f"or a family name ({', '.join(sorted(FAMILY_FORMATS))}) with --config")


def _detect_format(family: str, keys, checkpoint: str):
    for fmt in FAMILY_FORMATS[family]:
        if fmt.matches(keys):
            return fmt
    looks_like = [f.family for f in vit.FORMATS if f.family != family and f.matches(keys)]
    sample = ", ".join(sorted(keys)[:8])
    hint = f"; it looks like a {looks_like[0]} checkpoint" if looks_like else ""
    raise CheckpointError(f"{checkpoint} is not a {family} checkpoint in any supported format "
                          f"({', '.join(f.name for f in FAMILY_FORMATS[family])}){hint}. First keys: {sample}")


def _transformers_config_path(checkpoint: str) -> str:
    folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))
    return os.path.join(folder, "config.json")


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


def convert(checkpoint: str, output_dir: str, model: str, config_path: str | None = None,
            dinov2_resize: str = "auto") -> dict:
    """Convert `checkpoint` for `model` (a variant or family name) into `output_dir`; returns the metadata.

    dinov2_resize: 'auto' keeps the run-time pos-embed resize of the implementation the file came from;
    'official' or 'transformers' forces one (they differ for DINOv2 models without registers).
    """
    user_config = _read_json(config_path) if config_path else None
    family, kwargs = _resolve_model(model, user_config)
    state = read_state_dict(checkpoint)
    fmt = _detect_format(family, state.keys(), checkpoint)
    if kwargs is None:
        if not fmt.hf:
            raise CheckpointError(f"--model {family} needs --config CONFIG.json (the upstream constructor's keyword "
                                  f"arguments) or a known variant name: {', '.join(sorted(VARIANTS))}")
        config_path = _transformers_config_path(checkpoint)
        kwargs = _read_json(config_path)
    config = vit.parse_config(family, kwargs)
    if family == "dinov2" and dinov2_resize != "auto":
        config = vit.official_dinov2_resize(config, dinov2_resize)

    renamed, outside = {}, 0
    for key, value in state.items():
        name = fmt.normalise(key)
        if name is None:
            outside += 1
        else:
            renamed[name] = value
    if not renamed:
        raise CheckpointError(f"{checkpoint}: no keys under {fmt.select_prefix!r}")
    expected = {k: tuple(v.shape) for k, v in flatten(models.param_shapes(config)).items()}
    hooks = {}
    if fmt.load_time_pos_resize is not None:
        hooks["pos_embed"] = vit.pos_embed_load_resize(antialias=fmt.load_time_pos_resize)
    notes = [f"(format {fmt.name}; ignorable keys: {vit.IGNORED_KEYS_DOC[family]})"]
    params = apply_rules(renamed, fmt.rules, fmt.ignore, expected, checkpoint, model, hooks, notes)
    metadata = {
        "family": family,
        "model": model,
        "architecture": config.to_dict(),
        "source": {"file": os.path.basename(os.path.normpath(checkpoint)), "sha256": _sha256_of(checkpoint),
                   "format": fmt.name, "config": os.path.basename(config_path) if config_path else None,
                   "ignored_keys_outside_prefix": outside},
        "converter_version": CONVERTER_VERSION,
        "num_params": models.count_params(params),
    }
    pretrained.save(output_dir, params, metadata)
    return metadata


def _sha256_of(checkpoint: str) -> str:
    from converters.core import resolve_checkpoint

    files = resolve_checkpoint(checkpoint)
    return sha256(files[0]) if len(files) == 1 else ",".join(sha256(f) for f in files)
