"""Per-dataset normalisation statistics computed from the data, for datasets without published ones.

mean/std per channel of pixels in [0, 1] as the model sees them at evaluation (resize 256, center crop 224), over
the training split, or a seeded sample of `MAX_IMAGES` of it (order-independent: images are summed in split order
with float64 accumulators). With a work directory the result is cached in `<workdir>/splits/<name>.statistics.json`,
keyed by the sampled paths, sizes and modification times, so a resume does not decode the sample again.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os

import numpy as np

from medjax import rundir
from medjax.data.records import Dataset
from medjax.data.transforms import decode, eval_transform
from medjax.errors import atomic_write

log = logging.getLogger(__name__)
MAX_IMAGES = 1000
SAMPLE_SEED = 0


def _sample(dataset: Dataset) -> list[str]:
    paths = [r.path for r in dataset.splits["train"]]
    if len(paths) > MAX_IMAGES:
        keep = np.sort(np.random.default_rng(SAMPLE_SEED).choice(len(paths), MAX_IMAGES, replace=False))
        paths = [paths[i] for i in keep]
    return paths


def _sums(path: str, channels: int) -> np.ndarray | None:
    try:
        arr = eval_transform(decode(path, channels), 224).astype(np.float64) / 255.0
    except Exception:  # noqa: BLE001 - an unreadable image is reported by the check and the loader, not here
        return None
    flat = arr.reshape(-1, arr.shape[-1])
    return np.stack([np.full(flat.shape[1], flat.shape[0], np.float64), flat.sum(0), (flat ** 2).sum(0)])


def compute(dataset: Dataset, workdir: str | None = None) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, description) of the training split (see the module docstring)."""
    paths = _sample(dataset)
    key = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            key.update(f"{os.path.relpath(p, dataset.root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        except OSError:
            key.update(f"{p}:missing\n".encode())
    cache = rundir.split_file(workdir, dataset.name, "statistics.json") if workdir else None
    if cache and os.path.isfile(cache):
        try:
            with open(cache) as f:
                saved = json.load(f)
            if saved.get("key") == key.hexdigest():
                return tuple(saved["mean"]), tuple(saved["std"]), saved["source"]
        except (OSError, ValueError, KeyError):
            pass
    with concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        parts = [s for s in pool.map(lambda p: _sums(p, dataset.channels), paths) if s is not None]
    if not parts:
        return dataset.mean, dataset.std, "none: no readable training image"
    n, total, squares = np.sum(parts, axis=0)
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean ** 2, 0.0))
    source = (f"computed over {len(parts)} training images" + (f" (a seeded sample of {len(dataset.splits['train'])})"
                                                               if len(paths) < len(dataset.splits["train"]) else "")
              + ", resize 256 + center crop 224")
    mean_t, std_t = tuple(round(float(v), 4) for v in mean), tuple(round(max(float(v), 1e-3), 4) for v in std)
    if cache:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with atomic_write(cache) as f:
            json.dump({"key": key.hexdigest(), "mean": mean_t, "std": std_t, "source": source}, f)
    log.info("%s statistics: mean %s std %s (%s)", dataset.name, mean_t, std_t, source)
    return mean_t, std_t, source
