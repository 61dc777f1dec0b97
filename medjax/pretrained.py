"""Converted backbones on disk: `params.safetensors` + `medjax.json` (metadata).

The safetensors file holds every variable collection of the backbone under flat names: parameters by their Flax path
joined with `/` (`blocks_0/attn/qkv/kernel`), any other collection prefixed with its name and a colon
(`batch_stats:layer1_0/bn1/mean`). `medjax.json` records the family, the architecture, where the weights came from
and a SHA-256 digest of every tensor, checked when the folder is loaded, so a damaged file is named, not trained on.

safetensors is used rather than a pickle or msgpack: it cannot carry code, has no size limit (DINOv2-g is 4.5 GB in
float32), and is memory-mapped on load.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from medjax import outputs
from medjax.errors import UserError, atomic_path, atomic_write
from medjax.tree import file_sha256, flatten, flatten_variables, tensor_digest, unflatten, unflatten_variables  # noqa: F401

PARAMS_FILE = "params.safetensors"
METADATA_FILE = "medjax.json"
FORMAT_VERSION = 1


class PretrainedError(UserError):
    """A converted folder is missing, damaged, or does not fit its architecture."""


# Ranges of the integer architecture fields, by name, over every family's config (a list field: each element);
# any other integer field lies in INT_RANGE. Checked before anything is built or allocated (`check_architecture`).
ARCHITECTURE_RANGES = {
    "depth": (1, 256), "width": (1, 16384), "num_heads": (1, 1024), "patch_size": (1, 1024),
    "mlp_hidden": (1, 65536), "in_chans": (1, 4), "pos_grid": (1, 1024), "embed_dims": (1, 16384),
    "dims": (1, 16384), "stages": (0, 256), "depths": (0, 256), "layers": (0, 256), "block_config": (0, 256),
}
INT_RANGE = (0, 1 << 17)
MAX_BLOCKS = 512  # the sum of depth / stages / depths / layers / block_config
BLOCK_FIELDS = ("depth", "stages", "depths", "layers", "block_config")


def _ints(value) -> list:
    return [v for v in (value if isinstance(value, (list, tuple)) else [value])
            if isinstance(v, int) and not isinstance(v, bool)]


def check_architecture(meta_path: str, config_class: type, arch) -> None:
    """The architecture recorded in medjax.json against the family config's declared field types and the ranges
    above: one PretrainedError naming the field, before any model is built (a depth of 10^6 would take minutes and
    gigabytes to build)."""
    if not isinstance(arch, dict):
        raise PretrainedError(f"{meta_path}: architecture is {type(arch).__name__}, expected an object of fields")
    fields = {f.name: str(f.type) for f in dataclasses.fields(config_class)}
    for name, value in arch.items():
        kind = fields.get(name, "")
        where = f"{meta_path}: architecture field {name}={value!r}"
        if kind == "int" and (not isinstance(value, int) or isinstance(value, bool)):
            raise PretrainedError(f"{where}: expected an integer")
        if kind == "bool" and not isinstance(value, bool):
            raise PretrainedError(f"{where}: expected true or false")
        if kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                or not math.isfinite(value)):
            raise PretrainedError(f"{where}: expected a finite number")
        if kind.startswith("tuple") and not isinstance(value, (list, tuple)):
            raise PretrainedError(f"{where}: expected a list")
        low, high = ARCHITECTURE_RANGES.get(name, INT_RANGE)
        bad = [v for v in _ints(value) if not low <= v <= high]
        if bad:
            raise PretrainedError(f"{where}: expected integers in [{low}, {high}]")
    blocks = sum(sum(_ints(arch.get(k, 0))) for k in BLOCK_FIELDS)
    if blocks > MAX_BLOCKS:
        raise PretrainedError(f"{meta_path}: the architecture has {blocks} blocks; expected at most {MAX_BLOCKS}")


def save(output_dir: str, variables: dict, metadata: dict) -> None:
    """Write `variables` ({'params': ..., other collections}) and the metadata (with the tensors' digests). The files
    are written beside the target and renamed into place, metadata last: a killed save never leaves a folder that
    loads."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise PretrainedError(f"{output_dir}: exists and is not a folder; choose another output folder")
    os.makedirs(output_dir, exist_ok=True)
    flat = {k: np.ascontiguousarray(v) for k, v in flatten_variables(variables).items()}
    meta_path, params_path = os.path.join(output_dir, METADATA_FILE), os.path.join(output_dir, PARAMS_FILE)
    if os.path.exists(meta_path):
        os.remove(meta_path)  # the folder stops looking complete until the new metadata lands
    write_safetensors(params_path, flat)
    meta = {"medjax_format": FORMAT_VERSION, **metadata,
            "digests": {k: tensor_digest(v) for k, v in sorted(flat.items())}}
    with atomic_write(meta_path) as f:
        json.dump(meta, f, indent=2)


def write_safetensors(path: str, tensors: dict) -> None:
    """A safetensors file written atomically (errors.atomic_path: no half file is ever left on a failure) with an
    ordinary new file's mode (safetensors creates its file 0600)."""
    with atomic_path(path) as tmp:
        save_file(tensors, tmp)
        outputs.apply_umask(tmp)


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


def read(params_dir: str, architecture):
    """(config, variables, metadata) of a converted backbone. `architecture(family, arch, meta_path)` -> (config,
    {flat name: expected array shape/dtype}) is the model registry's reading of the metadata (`medjax.models.
    load_pretrained` passes it; this storage layer knows no family). Every tensor is checked against those shapes and
    dtypes (from the file's header, before any tensor is read) and against the digest recorded at conversion."""
    meta = read_metadata(params_dir)
    meta_path, params_path = os.path.join(params_dir, METADATA_FILE), os.path.join(params_dir, PARAMS_FILE)
    if not os.path.exists(params_path):
        raise PretrainedError(f"{params_path} not found: the converted folder is incomplete; convert the checkpoint "
                              "again")
    config, expected = architecture(meta.get("family"), meta.get("architecture"), meta_path)
    digests = meta.get("digests")
    if not isinstance(digests, dict) or not digests:
        raise PretrainedError(f"{meta_path}: no tensor digests recorded; the weights cannot be verified; convert the "
                              "checkpoint again")
    try:  # the header only: names, shapes and dtypes are checked before any tensor is read
        with safe_open(params_path, framework="numpy") as f:
            header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise PretrainedError(f"{params_path}: damaged or truncated ({e}); convert the checkpoint again") from e
    shapes = {k: tuple(s.shape) for k, s in expected.items()}
    got = {k: shape for k, (shape, _) in header.items()}
    problems = [f"missing {k}" for k in sorted(set(shapes) - set(got))]
    problems += [f"unexpected {k}" for k in sorted(set(got) - set(shapes))]
    problems += [f"{k}: {got[k]} != expected {shapes[k]}" for k in sorted(set(got) & set(shapes))
                 if got[k] != shapes[k]]
    problems += [f"{k}: dtype {header[k][1]} != expected {_dtype_name(expected[k].dtype)}"
                 for k in sorted(set(got) & set(shapes)) if header[k][1] != _dtype_name(expected[k].dtype)]
    if problems:
        raise PretrainedError(f"{params_path} does not match the architecture in {meta_path}:\n  " +
                              "\n  ".join(problems))
    try:
        flat = load_file(params_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise PretrainedError(f"{params_path}: damaged or truncated ({e}); convert the checkpoint again") from e
    bad = sorted(k for k, v in flat.items() if digests.get(k) != tensor_digest(v))
    if bad:
        raise PretrainedError(f"{params_path}: {len(bad)} tensor(s) differ from the digests recorded at conversion "
                              f"(first: {bad[0]}); the file is damaged; convert the checkpoint again")
    return config, unflatten_variables(flat), meta


_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int8": "I8",
                       "uint8": "U8", "int32": "I32", "int64": "I64", "bool": "BOOL"}


def _dtype_name(dtype) -> str:
    """A numpy / jax dtype as safetensors' header names it ('F32')."""
    return _SAFETENSORS_DTYPES.get(str(np.dtype(dtype)), str(dtype))
