"""Input pipelines on real-size images: medjax raw, medjax prepared, PyTorch DataLoader + PIL on the raw files.

    python benchmarks/data_prepared.py [--num 64] [--batches 3] [--workers 0] [--base DIR] [--datasets aptos2019,...]

Three datasets in their public layouts (written by `medjax.data fake`), every image replaced by a real-size synthetic
one (smooth background, sensor-like noise, the class mark; 8 distinct images per dataset, copied):
    aptos2019   fundus PNG, 3216 x 2136 RGB (~13 MB)
    isic2019    dermoscopy JPEG, 3216 x 2136 RGB, quality 95
    cbis_ddsm   mammogram DICOM, 2500 x 4000, 16-bit uncompressed (~20 MB)
Each is prepared twice (`python -m medjax.data prepare`, 256 px, all cores): lossless PNG (the default) and JPEG
quality 95. Then, over all the images of the dataset as one train split, each side delivers `--batches` batches
of 32 with the reference train transforms (after one warm-up batch), at the same worker count: medjax's grain
loader on the raw root (JPEG draft decoding on, the default), on the two prepared roots, and a PyTorch DataLoader
whose Dataset does the reference recipe with PIL (`benchmarks/data_pipeline.py`; pydicom through medjax's decoder
for DICOM).

The figure of merit is images/s per core: images delivered per CPU second of the loading process, its threads and
its worker processes (1000 / CPU ms per image), which does not depend on how busy the shared machine is; cores
needed = 1500 / that, for a 1,500 images/s accelerator (a ViT-B/16 fine-tune on one H100 in bf16). Wall-clock
images/s are printed too. Prints one JSON line per dataset and a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ACCELERATOR = 1500  # images/s
SIZES = {"aptos2019": (2136, 3216), "isic2019": (2136, 3216), "cbis_ddsm": (4000, 2500)}  # (height, width)
TEMPLATES = 8


def _template(name: str, k: int, path: str) -> None:
    from _fundus import fundus
    from PIL import Image

    from medjax.data import fake

    rng = np.random.default_rng(k)
    h, w = SIZES[name]
    if name == "cbis_ddsm":
        fake.save_dicom(fake.mammogram(rng, h, w, 1 + k % 2), path)
        return
    if name == "aptos2019":
        Image.fromarray(fundus(rng, h, w)).save(path, format="PNG")
        return
    img = np.clip(np.rint(fake.class_image(rng, h, w, 3, k % 5, 5)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, format="JPEG", quality=95)


def write_real_size(name: str, root: str, num: int) -> str:
    """The dataset's public layout with every image replaced by one of TEMPLATES real-size images (cached)."""
    from medjax import data
    from medjax.data import fake

    marker = os.path.join(root, ".real_size.json")
    want = {"dataset": name, "num": num, "size": SIZES[name], "templates": TEMPLATES}
    if os.path.isfile(marker) and json.load(open(marker)) == want:
        return root
    shutil.rmtree(root, ignore_errors=True)
    fake.write(name, root, num, seed=0, size=32)
    templates = os.path.join(root, ".templates")
    os.makedirs(templates)
    paths = []
    for k in range(TEMPLATES):
        paths.append(os.path.join(templates, f"{k}.bin"))
        _template(name, k, paths[-1])
    ds = data.get_dataset(name, root, check_images="exists")
    for i, r in enumerate(rec for recs in ds.splits.values() for rec in recs):
        shutil.copyfile(paths[i % TEMPLATES], r.path)
    shutil.rmtree(templates)
    json.dump(want, open(marker, "w"))
    return root


def _as_one_split(ds):
    return dataclasses.replace(ds, splits={"train": [r for recs in ds.splits.values() for r in recs]})


def _epochs(loader):
    """A torch DataLoader's batches, epoch after epoch (as the medjax loaders cycle)."""
    while True:
        yield from loader


def measure(make_iter, batches: int) -> dict:
    from medjax.data.bench import _cpu_seconds

    it = make_iter()
    next(it)  # warm-up: threads, worker processes, first reads
    cpu, start, images = _cpu_seconds(), time.perf_counter(), 0
    for _ in range(batches):
        batch = next(it)
        images += len(batch[0] if isinstance(batch, (list, tuple)) else batch["image"])
    wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    return {"images_per_s": images / wall, "cpu_ms_per_image": cpu * 1000 / images,
            "per_core": images / cpu, "cores_for_1500": ACCELERATOR * cpu / images}


def bench_dataset(name: str, base: str, num: int, batches: int, workers: int, prepare_workers: int) -> dict:
    import torch
    from data_pipeline import torch_loader

    from medjax import data
    from medjax.data import prepare, transforms

    raw_root = write_real_size(name, os.path.join(base, name), num)
    summaries, prepared_sets = {}, {}
    for fmt in ("png", "jpeg"):
        prep_root = os.path.join(base, f"{name}_prepared_{fmt}")
        start = time.perf_counter()
        summaries[fmt] = prepare.prepare(name, raw_root, prep_root, image_format=fmt, workers=prepare_workers,
                                         progress=False)
        summaries[fmt]["prepare_s"] = time.perf_counter() - start if summaries[fmt]["written"] else None
        prepared_sets[fmt] = _as_one_split(data.get_dataset(name, prep_root, check_images="exists"))
    summary = summaries["png"]
    raw = _as_one_split(data.get_dataset(name, raw_root, check_images="exists"))
    kw = dict(batch_size=32, image_size=224, train=True, seed=0, shard_index=0, shard_count=1, worker_count=workers)
    paths = [r.path for r in raw.splits["train"]]
    channels = raw.channels
    if name == "cbis_ddsm":
        open_image = lambda p: transforms.decode(p, channels)  # noqa: E731 - pydicom, as a PyTorch user would
    else:
        open_image = None if channels == 3 else (lambda p: transforms.Image.open(p).convert("L"))  # noqa: E731
    torch.set_num_threads(1)
    rows = {
        "raw": measure(lambda: data.make_loader(raw, "train", **kw), batches),
        "prepared": measure(lambda: data.make_loader(prepared_sets["png"], "train", **kw), batches),
        "prepared_jpeg": measure(lambda: data.make_loader(prepared_sets["jpeg"], "train", **kw), batches),
        "torch": measure(lambda: _epochs(torch_loader(paths, 32, workers, 0, open_image, raw.mean, raw.std)), batches),
    }
    return {"dataset": name, "size": "x".join(map(str, SIZES[name][::-1])), "images": len(paths), "workers": workers,
            **{f"{side}_{k}": round(v, 2) for side, r in rows.items() for k, v in r.items()},
            "prepared_vs_torch": round(rows["prepared"]["per_core"] / rows["torch"]["per_core"], 1),
            "prepared_jpeg_vs_torch": round(rows["prepared_jpeg"]["per_core"] / rows["torch"]["per_core"], 1),
            "storage_ratio": summary["ratio"], "storage_ratio_jpeg": summaries["jpeg"]["ratio"],
            "raw_bytes": summary["source_bytes"], "prepared_bytes": summary["bytes"],
            "prepare_s_per_image": (round(summary["prepare_s"] / len(paths), 3) if summary["prepare_s"] else None),
            "prepare_workers": prepare_workers, "cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=64, help="images per dataset (all read as one train split)")
    parser.add_argument("--batches", type=int, default=3, help="timed batches of 32 per side, after one warm-up")
    parser.add_argument("--workers", type=int, default=0, help="worker processes, the same for every loader")
    parser.add_argument("--prepare-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--base", default=os.path.join(tempfile.gettempdir(), "medjax_bench_real_size"),
                        help="where the datasets are written (kept for reruns)")
    parser.add_argument("--datasets", default=",".join(SIZES), help="comma-separated subset of " + ",".join(SIZES))
    args = parser.parse_args(argv)
    results = []
    for name in args.datasets.split(","):
        results.append(bench_dataset(name, args.base, args.num, args.batches, args.workers, args.prepare_workers))
        print(json.dumps(results[-1]), flush=True)
    print("\n| dataset (image) | raw medjax | prepared PNG | prepared JPEG | PyTorch DataLoader | prepared / PyTorch "
          "(PNG, JPEG) | cores for 1,500 img/s (raw / PNG / PyTorch) | prepared size / raw (PNG, JPEG) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['dataset']} ({r['size']}) | {r['raw_per_core']:.1f} | {r['prepared_per_core']:.0f} | "
              f"{r['prepared_jpeg_per_core']:.0f} | {r['torch_per_core']:.1f} | {r['prepared_vs_torch']:.0f}x, "
              f"{r['prepared_jpeg_vs_torch']:.0f}x | {r['raw_cores_for_1500']:.0f} / {r['prepared_cores_for_1500']:.1f}"
              f" / {r['torch_cores_for_1500']:.0f} | {100 * r['storage_ratio']:.1f}%, "
              f"{100 * r['storage_ratio_jpeg']:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
