"""Converted backbones on disk: `params.safetensors` + `medjax.json` (metadata).

The safetensors file holds every variable collection of the backbone under flat names: parameters by their Flax path
joined with `/` (`blocks_0/attn/qkv/kernel`), any other collection prefixed with its name and a colon
(`batch_stats:layer1_0/bn1/mean`). `medjax.json` records the family, the architecture, where the weights came from
and a SHA-256 digest of every tensor, checked when the folder is loaded, so a damaged file is named, not trained on.

safetensors is used rather than a pickle or msgpack: it cannot carry code, has no size limit (DINOv2-g is 4.5 GB in
float32), and is memory-mapped on load.
"""

from __future__ import annotations

import json
import os

import numpy as np

from medjax import outputs
from medjax.errors import UserError
from medjax.tree import (file_sha256, flatten, flatten_variables, tensor_digest, unflatten,  # noqa: F401
                         unflatten_variables)

PARAMS_FILE = "params.safetensors"
METADATA_FILE = "medjax.json"
FORMAT_VERSION = 1


class PretrainedError(UserError):
    """A converted folder is missing, damaged, or does not fit its architecture."""


def save(output_dir: str, variables: dict, metadata: dict) -> None:
    """Write `variables` ({'params': ..., other collections}) and the metadata (with the tensors' digests). The files
    are written beside the target and renamed into place, metadata last: a killed save never leaves a folder that
    loads."""
    from safetensors.numpy import save_file

    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise PretrainedError(f"{output_dir}: exists and is not a folder; choose another output folder")
    os.makedirs(output_dir, exist_ok=True)
    flat = {k: np.ascontiguousarray(v) for k, v in flatten_variables(variables).items()}
    meta_path, params_path = os.path.join(output_dir, METADATA_FILE), os.path.join(output_dir, PARAMS_FILE)
    if os.path.exists(meta_path):
        os.remove(meta_path)  # the folder stops looking complete until the new metadata lands
    save_file(flat, params_path + ".tmp")
    outputs.apply_umask(params_path + ".tmp")  # safetensors creates its file 0600
    os.replace(params_path + ".tmp", params_path)
    meta = {"medjax_format": FORMAT_VERSION, **metadata,
            "digests": {k: tensor_digest(v) for k, v in sorted(flat.items())}}
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(meta_path + ".tmp", meta_path)


def read_metadata(params_dir: str) -> dict:
    meta_path = os.path.join(params_dir, METADATA_FILE)
    if not os.path.exists(meta_path):
        raise PretrainedError(f"{meta_path} not found: {params_dir} is not a converted backbone; create one with "
                              "`python -m converters CHECKPOINT OUTPUT_DIR --model NAME`")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PretrainedError(f"{meta_path}: not valid JSON ({e}); convert the checkpoint again") from e
    if not isinstance(meta, dict) or meta.get("medjax_format") != FORMAT_VERSION:
        got = meta.get("medjax_format") if isinstance(meta, dict) else None
        raise PretrainedError(f"{meta_path}: medjax_format {got!r}, this medjax reads {FORMAT_VERSION}")
    return meta


def load(params_dir: str):
    """(config, variables, metadata) of a converted backbone. Every tensor is checked against the architecture's
    variable shapes and against the digest recorded at conversion."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from medjax import models

    meta = read_metadata(params_dir)
    meta_path, params_path = os.path.join(params_dir, METADATA_FILE), os.path.join(params_dir, PARAMS_FILE)
    if not os.path.exists(params_path):
        raise PretrainedError(f"{params_path} not found: the converted folder is incomplete; convert the checkpoint "
                              "again")
    try:
        config = models.config_from_dict(meta["family"], meta["architecture"])
    except (KeyError, TypeError, ValueError) as e:
        raise PretrainedError(f"{meta_path}: cannot read the architecture: {e}") from e
    try:
        flat = load_file(params_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise PretrainedError(f"{params_path}: damaged or truncated ({e}); convert the checkpoint again") from e
    shapes = {k: tuple(s.shape) for k, s in flatten_variables(models.variable_shapes(config)).items()}
    got = {k: v.shape for k, v in flat.items()}
    problems = [f"missing {k}" for k in sorted(set(shapes) - set(got))]
    problems += [f"unexpected {k}" for k in sorted(set(got) - set(shapes))]
    problems += [f"{k}: {got[k]} != expected {shapes[k]}" for k in sorted(set(got) & set(shapes)) if got[k] != shapes[k]]
    if problems:
        raise PretrainedError(f"{params_path} does not match the architecture in {meta_path}:\n  " +
                              "\n  ".join(problems))
    digests = meta.get("digests")
    if digests is not None:
        bad = sorted(k for k, v in flat.items() if digests.get(k) != tensor_digest(v))
        if bad:
            raise PretrainedError(f"{params_path}: {len(bad)} tensor(s) differ from the digests recorded at conversion "
                                  f"(first: {bad[0]}); the file is damaged; convert the checkpoint again")
    return config, unflatten_variables(flat), meta
