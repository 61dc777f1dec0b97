"""Device mesh and shardings: a (`data`, `fsdp`) mesh, the batch split over both axes, parameters sharded by rules
over their paths (big_vision style: the first rule whose regex matches the path wins)."""

from __future__ import annotations

import collections
import itertools
from typing import Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from medjax.errors import UserError
from medjax.rules import RuleError, compile_rules, first_match
from medjax.tree import flatten, unflatten

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A mesh over every device of every process (or over `devices`, e.g. a TPU topology's for an ahead-of-time
    compile); -1 takes what the other axis leaves."""
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices)
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data * fsdp != n:
        raise UserError(f"config fields mesh.data={data} x mesh.fsdp={fsdp} do not cover the {n} devices; expected "
                        f"a product of {n} (or -1 on one axis: the devices the other leaves)")
    devices = np.asarray(devices).reshape(data, fsdp)
    return Mesh(devices, BATCH_AXES)


def fsdp_spec(shape: tuple, fsdp_size: int, min_size: int = 2 ** 14) -> P:
    """Shard the largest dimension divisible by the fsdp axis; small or indivisible parameters are replicated."""
    if fsdp_size == 1 or int(np.prod(shape)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def param_specs(params, mesh: Mesh, rules=((".*", "fsdp"),)) -> dict:
    """PartitionSpecs for a parameter tree: rules are (regex over the `/`-joined path, 'fsdp' | 'replicate')."""
    compiled = compile_rules(rules, "sharding_rules")
    bad = sorted({str(t) for _, t in compiled} - {"fsdp", "replicate"})
    if bad:
        raise RuleError(f"sharding_rules: the tactic must be 'fsdp' or 'replicate', got {', '.join(map(repr, bad))}")
    fsdp_size = mesh.shape["fsdp"]
    out = {}
    for path, leaf in flatten(params).items():
        hit = first_match(compiled, path)
        tactic = hit[1] if hit else "replicate"
        out[path] = fsdp_spec(tuple(np.shape(leaf)), fsdp_size) if tactic == "fsdp" else P()
    return unflatten(out)


def tree_shardings(tree, params, params_spec: dict, mesh: Mesh):
    """Shardings for any state tree (params, optimizer moments): a leaf whose path ends with a parameter's path and
    whose shape is that parameter's takes its spec; everything else (counters, rng) is replicated."""
    flat_spec = flatten(params_spec)
    shapes = {k: tuple(np.shape(v)) for k, v in flatten(params).items()}

    def spec_for(path, leaf):
        keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
        names = [str(k) for k in keys if k is not None]
        for start in range(len(names)):
            candidate = "/".join(names[start:])
            if candidate in flat_spec and shapes[candidate] == tuple(np.shape(leaf)):
                return NamedSharding(mesh, flat_spec[candidate])
        return NamedSharding(mesh, P())
    return jax.tree_util.tree_map_with_path(spec_for, tree)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def global_batch(batch: dict, mesh: Mesh) -> dict:
    """This process's slice of the batch (numpy) -> global jax.Arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in batch.items()}


def prefetch_to_device(batches: Iterable[dict], mesh: Mesh, size: int = 2) -> Iterator[dict]:
    """Global device batches (`global_batch`) from an iterable of host batches, with `size` batches already
    transferred ahead of the one handed out.

    jax dispatches a step asynchronously, so while step k runs the loop reads and transfers batch k + 1 + size: the
    host-to-device copy (and the host-side read) overlaps compute instead of sitting between two steps. The host
    iterable is read ahead of the consumer; bound it (itertools.islice) where its position must be exact, e.g. before
    checkpointing it. size 0 transfers each batch when it is asked for."""
    if size < 0:
        raise ValueError(f"prefetch size must be >= 0, got {size}")
    batches = iter(batches)
    ahead = collections.deque(global_batch(b, mesh) for b in itertools.islice(batches, size))
    for batch in batches:
        ahead.append(global_batch(batch, mesh))
        yield ahead.popleft()
    while ahead:
        yield ahead.popleft()
