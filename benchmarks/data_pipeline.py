"""Input-pipeline throughput: medjax's grain loader vs a PyTorch DataLoader doing the same work with PIL.

    python benchmarks/data_pipeline.py [--num 384] [--batch-size 32] [--workers 0] [--root DIR]

Both sides read the same 512x512 RGB PNGs (APTOS layout, written by `medjax.data fake` unless --root is given),
decode them and apply the reference train transforms (resize 256, center crop 224, RandomResizedCrop 224 scale
0.8-1.2, flips, ColorJitter p0.8, to [0, 1], normalise), then batch. The PyTorch side is the reference code's recipe
written by hand with PIL (no torchvision): a map-style Dataset under DataLoader(shuffle=True, drop_last=True) with
the same worker count. Each side runs one epoch from a fresh loader, `--repeats` times, alternating (after one
untimed epoch each to warm the file cache and imports); the clock includes start-up, which is also reported as the
time to the first batch. The best epoch of each side is reported (images/s counts images delivered in full
batches), with the CPU time per image (0 workers; workers' time is not visible) and the load average, since the
machine may be shared. Prints a JSON line.

medjax's per-image work runs on grain's read threads (Pillow releases the GIL) even with 0 worker processes; the
PyTorch DataLoader with 0 workers runs it serially in the main thread. That is each library's default behaviour at
the same worker count, which is what this compares.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MEAN, STD = (0.415, 0.221, 0.073), (0.275, 0.150, 0.081)  # APTOS statistics, as medjax's 'dataset' normalisation


def torch_loader(paths, batch_size, workers, seed, open_image=None, mean=MEAN, std=STD):
    """The reference recipe with PIL under a torch DataLoader; open_image(path) -> PIL image (default: Pillow's
    open, converted to RGB). Grayscale ('L') images skip saturation and hue, as torchvision does."""
    import torch
    from PIL import Image, ImageEnhance

    open_image = open_image or (lambda p: Image.open(p).convert("RGB"))

    bilinear = Image.Resampling.BILINEAR

    def rrc_params(h, w, scale=(0.8, 1.2), ratio=(3 / 4, 4 / 3)):
        area, log_r = h * w, (math.log(ratio[0]), math.log(ratio[1]))
        for _ in range(10):
            target = area * torch.empty(1).uniform_(*scale).item()
            aspect = math.exp(torch.empty(1).uniform_(*log_r).item())
            cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                return (torch.randint(0, h - ch + 1, (1,)).item(), torch.randint(0, w - cw + 1, (1,)).item(), ch, cw)
        return 0, 0, h, w

    def hue(img, factor):
        hh, s, v = img.convert("HSV").split()
        with np.errstate(over="ignore"):
            hh = Image.fromarray(np.asarray(hh, np.uint8) + np.uint8(int(factor * 255) % 256), "L")
        return Image.merge("HSV", (hh, s, v)).convert("RGB")

    mean, std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    class PILDataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            img = open_image(paths[i]).resize((256, 256), bilinear)
            img = img.crop((16, 16, 240, 240))
            top, left, h, w = rrc_params(224, 224)
            img = img.crop((left, top, left + w, top + h)).resize((224, 224), bilinear)
            if torch.rand(1).item() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
            if torch.rand(1).item() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if torch.rand(1).item() < 0.8:
                b, c, s = (torch.empty(1).uniform_(lo, hi).item() for lo, hi in ((0.8, 1.2), (0.8, 1.2), (0.9, 1.1)))
                hf = torch.empty(1).uniform_(-0.1, 0.1).item()
                for op in torch.randperm(4).tolist():
                    if op == 0:
                        img = ImageEnhance.Brightness(img).enhance(b)
                    elif op == 1:
                        img = ImageEnhance.Contrast(img).enhance(c)
                    elif op == 2 and img.mode == "RGB":
                        img = ImageEnhance.Color(img).enhance(s)
                    elif op == 3 and img.mode == "RGB":
                        img = hue(img, hf)
            arr = np.asarray(img)
            arr = arr[:, :, None] if arr.ndim == 2 else arr
            x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255)
            return (x - mean) / std, 0

    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(PILDataset(), batch_size=batch_size, shuffle=True, drop_last=True,
                                       num_workers=workers, generator=gen)


def timed_epoch(make_iter):
    """One epoch from a fresh loader: (images/s wall clock, s to the first batch, CPU ms per image of this process
    and its threads). The clock includes start-up (worker processes, first reads)."""
    start, cpu, images, first = time.perf_counter(), time.process_time(), 0, None
    for batch in make_iter():
        first = first or time.perf_counter() - start
        images += len(batch[0] if isinstance(batch, (list, tuple)) else batch["image"])
    return images / (time.perf_counter() - start), first, (time.process_time() - cpu) * 1000 / images


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=256, help="number of 512 px PNGs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="worker processes, the same for both loaders")
    parser.add_argument("--root", help="an APTOS-layout folder of 512 px PNGs (written here if missing)")
    parser.add_argument("--only", choices=("medjax", "torch"), help="run one side only")
    parser.add_argument("--repeats", type=int, default=2, help="timed epochs per side (alternating); best reported")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads in the loading process (1 is torch's fastest here: its "
                             "default of one per core made the per-image tensor ops several times slower)")
    args = parser.parse_args(argv)

    from medjax import data
    from medjax.data import fake

    root = args.root or os.path.join(tempfile.gettempdir(), f"medjax_bench_png512_{args.num}")
    if not os.path.exists(os.path.join(root, "train_1.csv")):
        fake.write("aptos2019", root, args.num, seed=0, size=512)
    ds = data.get_dataset("aptos2019", root)
    records = [r for split in ds.splits.values() for r in split]
    ds = dataclasses.replace(ds, splits={"train": records})
    paths = [r.path for r in records]
    result = {"images": len(paths), "source": "512x512 RGB PNG", "output": "224x224x3 float32",
              "batch_size": args.batch_size, "workers": args.workers, "cpus": os.cpu_count()}

    if args.only != "medjax":
        import torch

        torch.set_num_threads(args.torch_threads)
        result["torch_threads"] = args.torch_threads
    loaders = {}
    if args.only != "torch":
        loaders["medjax"] = lambda: data.make_loader(
            ds, "train", batch_size=args.batch_size, image_size=224, train=True, seed=0, num_epochs=1,
            worker_count=args.workers, shard_index=0, shard_count=1)
    if args.only != "medjax":
        loaders["torch"] = lambda: iter(torch_loader(paths, args.batch_size, args.workers, 0))
    for make in loaders.values():
        timed_epoch(make)  # warm-up
    runs = {side: [] for side in loaders}
    for _ in range(args.repeats):  # alternate the sides so that load from other users hits both alike
        for side, make in loaders.items():
            runs[side].append(timed_epoch(make))
    for side, r in runs.items():
        result[f"{side}_images_per_s"] = max(x[0] for x in r)
        result[f"{side}_runs_images_per_s"] = [round(x[0], 1) for x in r]
        result[f"{side}_first_batch_s"] = min(x[1] for x in r)
        if args.workers == 0:
            result[f"{side}_cpu_ms_per_image"] = min(x[2] for x in r)
    if len(runs) == 2:
        result["ratio"] = result["medjax_images_per_s"] / result["torch_images_per_s"]
    result["load_average_1min"] = os.getloadavg()[0]
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
