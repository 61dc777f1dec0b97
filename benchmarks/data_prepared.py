"""Input pipelines on real-size images: medjax raw, medjax prepared (old and new format), PyTorch DataLoader + PIL.

    python benchmarks/data_prepared.py [--num 64] [--batches 12] [--batch-size 8] [--rounds 3] [--workers 0]
        [--old DIR] [--base DIR] [--datasets aptos2019,...]

Three datasets in their public layouts (written by `medjax.data fake`), every image replaced by a real-size synthetic
one (8 distinct images per dataset, copied):
    aptos2019   fundus PNG, 3216 x 2136 RGB (`_fundus.py`: disc, vessels, optic disc, noise; ~5.6 MB)
    isic2019    dermoscopy JPEG, 3216 x 2136 RGB, quality 95 (smooth background, noise, the class mark)
    cbis_ddsm   mammogram DICOM, 2500 x 4000, 16-bit uncompressed (~20 MB)
Each is prepared (`python -m medjax.data prepare`, for 224 px, all cores) in format 2 as raw uint8 (the default),
PNG and JPEG quality 95, and with --old (a checkout of medjax before issue 24, e.g. `git archive 5591dca medjax |
tar -x -C DIR`) in format 1 (PNG of the shorter side at 256 px) by that checkout. Then every side is measured
`--rounds` times, alternating, with `python -m medjax.data bench` in a fresh process (the old format with the old
checkout's bench): `--batches` train batches of `--batch-size` with the reference train transforms after 3 warm-up
batches; likewise the raw root (JPEG draft decoding on, the default) and, in this process, a PyTorch DataLoader whose
Dataset does the reference recipe with PIL on the raw files (`benchmarks/data_pipeline.py`; pydicom through medjax's
decoder for DICOM).

The figure of merit is the CPU time per image of the loading process, its threads and its worker processes, and
images/s per core = 1000 / that; it holds on a shared machine better than wall-clock rates (printed too), though a
crowded machine still inflates it (the load average is reported). Cores needed for a 1,500 images/s accelerator (a
ViT-B/16 fine-tune on one H100 in bf16) = 1.5 x ms. Prints one JSON line per dataset and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ACCELERATOR = 1500  # images/s
SIZES = {"aptos2019": (2136, 3216), "isic2019": (2136, 3216), "cbis_ddsm": (4000, 2500)}  # (height, width)
TEMPLATES = 8
MARKER = ".real_size.json"  # in a real-size dataset folder: what was written
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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

    marker = os.path.join(root, MARKER)
    want = {"dataset": name, "num": num, "size": SIZES[name], "templates": TEMPLATES,
            "generator": "fundus" if name == "aptos2019" else "class_image"}
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
            "images_per_s_per_core": images / cpu, "load_average_1min": os.getloadavg()[0]}


def _cli(checkout: str, *args: str) -> dict:
    """`python -m medjax.data ARGS` with medjax imported from `checkout`; its last stdout line, a JSON object."""
    env = dict(os.environ, PYTHONPATH=checkout)
    proc = subprocess.run([sys.executable, "-m", "medjax.data", *args], cwd=checkout, env=env, capture_output=True,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"medjax.data {' '.join(args)} ({checkout}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else "unknown CPU"


def bench_dataset(name: str, base: str, num: int, batches: int, batch_size: int, rounds: int, workers: int,
                  prepare_workers: int, old: str | None) -> dict:
    """Every side `rounds` times, the sides alternating within each round: medjax's loader through `python -m
    medjax.data bench` (a fresh process per measurement) on the raw root, on the old-format copy (with the old
    checkout), and on the format-2 copies (raw, png, jpeg); the PyTorch DataLoader in this process."""
    import torch
    from data_pipeline import torch_loader

    from medjax import data
    from medjax.data import transforms

    raw_root = write_real_size(name, os.path.join(base, name), num)
    roots, summaries = {"raw": raw_root}, {}
    formats = {"v2_raw": (ROOT, "raw"), "v2_png": (ROOT, "png"), "v2_jpeg": (ROOT, "jpeg")}
    if old:
        formats = {"v1_png": (old, "png"), **formats}
    for side, (checkout, fmt) in formats.items():
        out = os.path.join(base, f"{name}_prepared_{side}")
        meta = os.path.join(out, "medjax_prepared.json")
        if not os.path.exists(meta) or os.path.getmtime(meta) < os.path.getmtime(os.path.join(raw_root, MARKER)):
            shutil.rmtree(out, ignore_errors=True)  # unfinished, or prepared from images written over since
        start = time.perf_counter()
        summaries[side] = _cli(checkout, "prepare", "--dataset", name, "--root", raw_root, "--output", out,
                               "--format", fmt, "--workers", str(prepare_workers))
        summaries[side]["prepare_s"] = time.perf_counter() - start if summaries[side]["written"] else None
        roots[side] = out
    raw = data.get_dataset(name, raw_root, check_images="exists")
    paths = [r.path for recs in raw.splits.values() for r in recs]
    if name == "cbis_ddsm":
        open_image = lambda p: transforms.decode(p, raw.channels)  # noqa: E731 - pydicom, as a PyTorch user would
    else:
        open_image = None if raw.channels == 3 else (lambda p: transforms.Image.open(p).convert("L"))  # noqa: E731
    torch.set_num_threads(1)
    bench_args = ["--batches", str(batches), "--batch-size", str(batch_size), "--workers", str(workers), "--json"]
    runs = {side: [] for side in [*roots, "torch"]}
    for k in range(rounds):
        order = list(runs) if k % 2 == 0 else list(runs)[::-1]  # alternate: load from other users hits all alike
        for side in order:
            if side == "torch":
                runs[side].append(measure(lambda: _epochs(torch_loader(paths, batch_size, workers, k, open_image,
                                                                       raw.mean, raw.std)), batches))
            else:
                checkout = formats[side][0] if side in formats else ROOT
                runs[side].append(_cli(checkout, "bench", "--dataset", name, "--root", roots[side], *bench_args))
                runs[side][-1]["load_average_1min"] = os.getloadavg()[0]  # the old checkout's bench has none
    out = {"dataset": name, "size": "x".join(map(str, SIZES[name][::-1])), "images": len(paths),
           "raw_bytes_per_image": round(summaries["v2_raw"]["source_bytes"] / len(paths)), "workers": workers,
           "batch_size": batch_size, "batches": batches, "rounds": rounds, "cpu": cpu_model(),
           "cpus": os.cpu_count()}
    for side, r in runs.items():
        ms = [x["cpu_ms_per_image"] for x in r]
        out[f"{side}_ms"] = round(statistics.median(ms), 2)
        out[f"{side}_ms_rounds"] = [round(v, 2) for v in ms]
        out[f"{side}_per_core"] = round(1000 / statistics.median(ms), 1)
        out[f"{side}_images_per_s"] = round(statistics.median(x["images_per_s"] for x in r), 1)
    for side, summary in summaries.items():
        out[f"{side}_storage_ratio"] = summary["ratio"]
        out[f"{side}_bytes_per_image"] = round(summary["bytes"] / sum(summary["images"].values()))
    out["v2_vs_torch"] = round(out["torch_ms"] / out["v2_raw_ms"], 1)
    loads = [x["load_average_1min"] for r in runs.values() for x in r]
    out["load_average_1min"] = [round(min(loads), 1), round(statistics.median(loads), 1), round(max(loads), 1)]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=64, help="images per dataset")
    parser.add_argument("--batches", type=int, default=12, help="timed batches per side and round, after warm-up")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="measurements of every side, alternating; median")
    parser.add_argument("--workers", type=int, default=0, help="worker processes, the same for every loader")
    parser.add_argument("--prepare-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--old", help="a checkout of medjax with the format-1 prepare (PNG of the shorter side at 256 "
                                      "px), e.g. `git worktree add /tmp/medjax_v1 5591dca`: measured side by side")
    parser.add_argument("--base", default=os.path.join(tempfile.gettempdir(), "medjax_bench_real_size"),
                        help="where the datasets are written (kept for reruns)")
    parser.add_argument("--datasets", default=",".join(SIZES), help="comma-separated subset of " + ",".join(SIZES))
    args = parser.parse_args(argv)
    results = []
    for name in args.datasets.split(","):
        results.append(bench_dataset(name, args.base, args.num, args.batches, args.batch_size, args.rounds,
                                     args.workers, args.prepare_workers, args.old and os.path.abspath(args.old)))
        print(json.dumps(results[-1]), flush=True)
    old = "v1_png_ms" in results[0]
    loads = [v for r in results for v in r["load_average_1min"]]
    print(f"\nCPU ms per image (images/s per core), median of {args.rounds} rounds; {results[0]['cpu']}, "
          f"{results[0]['cpus']} cores, load average {min(loads):.1f}-{max(loads):.1f}, batches of {args.batch_size}, "
          f"{args.workers} workers")
    print("\n| dataset (image, raw size) | raw medjax |" + (" prepared v1 (PNG) |" if old else "") +
          " prepared v2 (raw) | v2 PNG | v2 JPEG | PyTorch DataLoader | v2 / PyTorch | cores for 1,500 img/s "
          "(v2 / PyTorch) | stored / raw (" + ("v1, " if old else "") + "v2 raw, PNG, JPEG) |")
    print("|---|---|" + ("---|" if old else "") + "---|---|---|---|---|---|---|")
    for r in results:
        cell = lambda side: f"{r[side + '_ms']:.2f} ({r[side + '_per_core']:.0f})"  # noqa: E731
        sizes = [r[f"{s}_storage_ratio"] for s in (["v1_png"] if old else []) + ["v2_raw", "v2_png", "v2_jpeg"]]
        print(f"| {r['dataset']} ({r['size']}, {r['raw_bytes_per_image'] / 1e6:.1f} MB) | {cell('raw')} | " +
              (f"{cell('v1_png')} | " if old else "") +
              f"{cell('v2_raw')} | {cell('v2_png')} | {cell('v2_jpeg')} | {cell('torch')} | {r['v2_vs_torch']:.0f}x | "
              f"{1.5 * r['v2_raw_ms']:.1f} / {1.5 * r['torch_ms']:.0f} | "
              + ", ".join(f"{100 * v:.1f}%" for v in sizes) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
