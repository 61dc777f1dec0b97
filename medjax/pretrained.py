"""Converted backbones on disk: `params.safetensors` (Flax paths joined by `/`) + `medjax.json` (metadata).

safetensors is used rather than a pickle or msgpack: it cannot carry code, has no size limit (DINOv2-g is 4.5 GB in
float32), and is memory-mapped on load.
"""

from __future__ import annotations

import json
import os

import numpy as np

from medjax import models

PARAMS_FILE = "params.safetensors"
METADATA_FILE = "medjax.json"
FORMAT_VERSION = 1


def flatten(tree, prefix="") -> dict:
    """{'a': {'b': leaf}} -> {'a/b': leaf}."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else k
        out.update(flatten(v, path) if isinstance(v, dict) else {path: v})
    return out


def unflatten(flat: dict) -> dict:
    tree = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def save(output_dir: str, params: dict, metadata: dict) -> None:
    from safetensors.numpy import save_file

    os.makedirs(output_dir, exist_ok=True)
    flat = {k: np.ascontiguousarray(v) for k, v in flatten(params).items()}
    save_file(flat, os.path.join(output_dir, PARAMS_FILE))
    with open(os.path.join(output_dir, METADATA_FILE), "w") as f:
        json.dump({"medjax_format": FORMAT_VERSION, **metadata}, f, indent=2)


def load(params_dir: str):
    """(config, params) of a converted backbone; the parameter tree is checked against the architecture."""
    from safetensors.numpy import load_file

    meta_path = os.path.join(params_dir, METADATA_FILE)
    params_path = os.path.join(params_dir, PARAMS_FILE)
    for path in (meta_path, params_path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: {params_dir} is not a converted backbone; create one with "
                                    "`python -m converters CHECKPOINT OUTPUT_DIR --model NAME`")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("medjax_format") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: medjax_format {meta.get('medjax_format')!r}, this medjax reads {FORMAT_VERSION}")
    config = models.config_from_dict(meta["family"], meta["architecture"])
    flat = load_file(params_path)
    shapes = {k: tuple(s.shape) for k, s in flatten(models.param_shapes(config)).items()}
    got = {k: v.shape for k, v in flat.items()}
    problems = [f"missing {k}" for k in sorted(set(shapes) - set(got))]
    problems += [f"unexpected {k}" for k in sorted(set(got) - set(shapes))]
    problems += [f"{k}: {got[k]} != expected {shapes[k]}" for k in sorted(set(got) & set(shapes)) if got[k] != shapes[k]]
    if problems:
        raise ValueError(f"{params_path} does not match the architecture in {meta_path}:\n  " + "\n  ".join(problems))
    return config, unflatten(flat), meta
