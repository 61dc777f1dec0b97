"""Small tree and file helpers every layer uses: `/`-joined paths of nested dicts, a file's SHA-256, a tensor digest."""

from __future__ import annotations

import hashlib

import numpy as np


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


def flatten_variables(variables: dict) -> dict:
    """{'params': tree, 'batch_stats': tree} -> {'path': leaf, 'batch_stats:path': leaf}."""
    out = {}
    for collection, tree in variables.items():
        prefix = "" if collection == "params" else f"{collection}:"
        out.update({prefix + k: v for k, v in flatten(dict(tree)).items()})
    return out


def unflatten_variables(flat: dict) -> dict:
    """The inverse of `flatten_variables`; always has a `params` entry."""
    groups: dict[str, dict] = {"params": {}}
    for key, v in flat.items():
        collection, _, path = key.rpartition(":")
        groups.setdefault(collection or "params", {})[path] = v
    return {c: unflatten(g) for c, g in groups.items()}


def file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB blocks (checkpoints and prepared datasets are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def tensor_digest(a) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha256(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes()).hexdigest()
