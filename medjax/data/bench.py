"""`python -m medjax.data bench`: the train loader's throughput on a dataset root, raw or prepared.

Reads `batches` batches of `batch_size` with the reference train transforms (after `warmup` batches, which also start
grain's threads and worker processes; epochs cycle when the split is short) and reports the wall-clock rate and the
CPU time per image of this process and its worker processes (all threads), which is what the rate costs in host
cores: images/s per core = 1000 / (cpu ms/image).
"""

from __future__ import annotations

import os
import time

from medjax import data


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process with its threads, and of its live and finished children."""
    total = time.process_time()  # this process, every thread, at the clock's full resolution
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with tensorflow-datasets
        return total
    me = psutil.Process()
    total += sum(me.cpu_times()[2:4])  # children_user, children_system: finished children
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            continue
    return total


def bench(name: str, root: str, *, batches: int = 50, workers: int = 0, batch_size: int = 32, image_size: int = 224,
          warmup: int = 3, seed: int = 0, check_images: str = "exists", **options) -> dict:
    """{'dataset', 'root', 'prepared', 'images', 'workers', 'batch_size', 'images_per_s', 'cpu_ms_per_image',
    'images_per_s_per_core', 'seconds', 'load_average_1min'} for `batches` train batches after `warmup` (see the module
    docstring; the load average says how busy the machine was: CPU time per image grows on a crowded one)."""
    ds = data.get_dataset(name, root, check_images=check_images, **options)
    loader = data.make_loader(ds, "train", batch_size=batch_size, image_size=image_size, train=True, seed=seed,
                              shard_index=0, shard_count=1, num_epochs=None, worker_count=workers)
    for _ in range(warmup):
        next(loader)
    cpu, start = _cpu_seconds(), time.perf_counter()
    images = 0
    for _ in range(batches):
        images += len(next(loader)["image"])
    seconds = time.perf_counter() - start
    cpu_ms = (_cpu_seconds() - cpu) * 1000 / images
    return {"dataset": name, "root": os.path.abspath(root), "prepared": ds.prepared is not None, "images": images,
            "workers": workers, "batch_size": batch_size, "images_per_s": images / seconds, "cpu_ms_per_image": cpu_ms,
            "images_per_s_per_core": 1000 / cpu_ms if cpu_ms > 0 else float("inf"), "seconds": seconds,
            "load_average_1min": os.getloadavg()[0]}
