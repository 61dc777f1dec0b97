"""Verified checkpoints: every orbax checkpoint and best model the trainer writes carries the SHA-256 of each of its
arrays (`medjax.tree.tensor_digest`: dtype, shape and bytes) in the orbax step's own metadata, so the digests are
committed with the arrays (the same temporary folder, the same rename); every restore recomputes them.

A restored array whose digest differs, an array the digests do not name, or a step orbax cannot read raises
`DamagedCheckpoint`, one line naming the folder and the first array; the trainer then falls back to the previous
checkpoint (saying so), predict / export / explain stop with that line.
"""

from __future__ import annotations

import jax
import numpy as np
import orbax.checkpoint as ocp

from medjax import rundir
from medjax.errors import UserError
from medjax.tree import tensor_digest


class DamagedCheckpoint(UserError):
    """A checkpoint or best model whose arrays do not match their recorded digests, or that cannot be read."""


def host(tree):
    """The tree's arrays as whole numpy arrays on this host (gathered from every process when they are sharded over
    several)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return jax.tree_util.tree_map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def digests(tree) -> dict:
    """{path: SHA-256 of dtype, shape and bytes} of every array of the tree (`params/head/kernel` paths)."""
    leaves = jax.tree_util.tree_flatten_with_path(host(tree))[0]
    return {_path_name(p): tensor_digest(np.asarray(v)) for p, v in leaves}


def _path_name(path) -> str:
    """('params', 'head', 'kernel') key path -> 'params/head/kernel' (dict keys, dataclass fields, list indices)."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def check(tree, recorded, where: str) -> None:
    """Raises DamagedCheckpoint when `tree` does not match the `recorded` digests (None: a folder written before
    digests existed, or with its metadata lost)."""
    if not isinstance(recorded, dict):
        raise DamagedCheckpoint(f"{where}: no array digests in its metadata (_CHECKPOINT_METADATA): it is damaged, or "
                                "was written by a medjax without checkpoint digests, so it cannot be verified")
    now = digests(tree)
    unrecorded, missing = sorted(set(now) - set(recorded)), sorted(set(recorded) - set(now))
    if unrecorded or missing:
        raise DamagedCheckpoint(f"{where}: its arrays are not those its digests name ({len(unrecorded)} unrecorded, "
                                f"first {(unrecorded or ['-'])[0]}; {len(missing)} missing, first "
                                f"{(missing or ['-'])[0]}); it is damaged or was written by another medjax")
    bad = sorted(k for k in now if recorded[k] != now[k])
    if bad:
        raise DamagedCheckpoint(f"{where}: {len(bad)} array(s) differ from the digests recorded when it was written "
                                f"(first: {bad[0]}); the files are damaged")


def recorded_digests(step_metadata) -> dict | None:
    custom = getattr(step_metadata, "custom_metadata", None) or {}
    return custom.get(rundir.DIGESTS_KEY)


# ------------------------------------------------------------------------------------------------ best models


def save_best(folder: str, variables) -> None:
    """Writes a best model (every variable collection) with its digests: orbax writes a temporary folder and renames
    it into place when complete, the digests inside."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(folder, variables, force=True, custom_metadata={rundir.DIGESTS_KEY: digests(variables)})
        ckptr.wait_until_finished()


def restore_best(folder: str, abstract):
    """The best model in `folder`, restored onto `abstract`'s shardings and verified against its digests."""
    where = folder
    with ocp.StandardCheckpointer() as ckptr:
        try:
            recorded = recorded_digests(ckptr.metadata(folder))
            variables = ckptr.restore(folder, abstract)
        except Exception as e:  # noqa: BLE001 - any failure to read the folder's files is damage to report
            raise DamagedCheckpoint(f"{where}: cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:300]})"
                                    "; the files are damaged or incomplete") from None
    check(variables, recorded, where)
    return variables
