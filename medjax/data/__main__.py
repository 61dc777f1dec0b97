"""python -m medjax.data fake|describe|options|prepare|bench

  fake      --dataset NAME --root DIR --num N [--seed S] [--size PX]   write a synthetic dataset in the public layout
  describe  --dataset NAME --root DIR [--option KEY=VALUE ...]         print the splits as read, as JSON
  options   [--dataset NAME]                                           the data options: default and help, as JSON
  prepare   --dataset NAME --root RAW --output DIR [--max-size PX] [--resize square|shorter] [--format raw|png|jpeg]
            [--workers N]   decode every image once, store it at the training size as a TFDS ArrayRecord dataset
            (`medjax.data.prepare`); DIR is then a dataset root for every command, the trainer and the protocols
  bench     --dataset NAME --root DIR [--batches N] [--workers W]     train-loader throughput, raw or prepared root

describe prints {"dataset": NAME, "splits": {"train": {"images": N, "labels": {CLASS: COUNT}, "patients": N or
null}, "val": ..., "test": ...}} to stdout (label counts are positives per class for multi-label sets); skipped
images (with --skip-bad-images) are reported on stderr. prepare prints a JSON summary (images per split, bytes,
the storage ratio to the raw images, the records' digest); bench prints `images/s: X`, `cpu ms/image: Y`, `images/s
per core: 1000 / Y` and the load average. Bad input exits 2 with one `error:` line naming the file and row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from medjax import data
from medjax.data import bench, fake, prepare
from medjax.data.transforms import RESIZE_MODES
from medjax.errors import cli_main, error_line


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _reader_args(parser, root_help: str | None = None, option_help: str = "reader option, as describe") -> None:
    """The arguments of the commands that read a dataset: which one, its root, the split seed, reader options."""
    parser.add_argument("--dataset", required=True, choices=sorted(data.READERS))
    parser.add_argument("--root", required=True, help=root_help)
    parser.add_argument("--seed", type=int, default=None, help="split seed (default: the reader's)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help=option_help)


@cli_main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medjax.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fake", help="write a small synthetic dataset in its public layout")
    f.add_argument("--dataset", required=True, choices=sorted(fake.WRITERS))
    f.add_argument("--root", required=True, help="folder to write into (the dataset root a reader takes)")
    f.add_argument("--num", type=int, default=32, help="number of images (CheXpert: train.csv rows)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--size", type=int, default=64, help="image height in pixels")
    d = sub.add_parser("describe", help="read a dataset and print its splits as JSON")
    _reader_args(d, option_help="reader option, value as JSON or a string, e.g. uncertain=ones, frontal_only=true")
    d.add_argument("--workdir", help="also write the split file to WORKDIR/splits/NAME.json")
    d.add_argument("--check-images", choices=data.CHECKS, default="verify",
                   help="start-up image check (default verify: every image exists and is intact)")
    d.add_argument("--skip-bad-images", action="store_true")
    o = sub.add_parser("options", help="print each dataset's data options (default, help) as JSON")
    o.add_argument("--dataset", choices=sorted(data.READERS))
    p = sub.add_parser("prepare", help="store a dataset's images decoded and resized, as TFDS ArrayRecord files")
    _reader_args(p, "the dataset in its public layout")
    p.add_argument("--output", required=True, help="a new (or empty) folder: the prepared dataset root")
    p.add_argument("--max-size", type=int, default=prepare.DEFAULT_MAX_SIZE,
                   help="the loader's resize before the crop, in pixels (default %(default)s: image_size 224; use "
                        "round(S * 256 / 224) for image_size S): images are stored resized as the loader resizes them")
    p.add_argument("--resize", choices=RESIZE_MODES, default="square",
                   help="the run's config.resize: square (default, the study: S' x S') or shorter (aspect kept)")
    p.add_argument("--format", choices=prepare.FORMATS, default="raw",
                   help="raw (default: uint8 pixels, lossless, zstd-compressed, no decoding), png (lossless, "
                        "smaller, decoded on reading) or jpeg")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality (--format jpeg)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes (default %(default)s)")
    p.add_argument("--skip-bad-images", action="store_true", help="leave unreadable images out (listed)")
    p.add_argument("--allow-outside-root", action="store_true")
    b = sub.add_parser("bench", help="read train batches and print images/s and CPU ms per image")
    _reader_args(b, "a dataset root, raw or prepared")
    b.add_argument("--batches", type=int, default=50, help="timed batches of --batch-size (after --warmup)")
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--workers", type=int, default=0, help="grain worker processes (0: read threads only)")
    b.add_argument("--image-size", type=int, default=224)
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    args = parser.parse_args(argv)

    if args.command == "options":
        names = [args.dataset] if args.dataset else list(data.OPTIONS)
        print(json.dumps({n: {k: {"default": d, "help": h} for k, (d, h) in data.OPTIONS[n].items()} for n in names},
                         indent=1))
        return 0

    if args.command == "fake":
        try:
            print(json.dumps(fake.write(args.dataset, args.root, args.num, args.seed, args.size)))
        except data.DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:
            print(error_line(e), file=sys.stderr)
            return 2
        return 0
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--option {item!r}: expected KEY=VALUE")
        options[key] = _value(value)
    if args.seed is not None:
        options["seed"] = args.seed
    if args.command == "prepare":
        reader_options = {k: v for k, v in options.items() if k not in data.COMMON_OPTIONS}
        try:
            summary = prepare.prepare(args.dataset, args.root, args.output, max_size=args.max_size,
                                      resize=args.resize, image_format=args.format, quality=args.quality,
                                      workers=args.workers,
                                      options=reader_options, skip_bad_images=args.skip_bad_images,
                                      allow_outside_root=args.allow_outside_root)
        except data.DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:
            print(f"{error_line(e)}; run the same command again to resume", file=sys.stderr)
            return 2
        print(json.dumps(summary))
        return 0
    if args.command == "bench":
        try:
            result = bench.bench(args.dataset, args.root, batches=args.batches, workers=args.workers,
                                 batch_size=args.batch_size, image_size=args.image_size, warmup=args.warmup,
                                 **options)
        except data.DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        kind = "prepared" if result["prepared"] else "raw"
        print(f"{args.dataset} ({kind}, {args.workers} worker processes): {result['images']} images in "
              f"{result['seconds']:.1f} s")
        print(f"images/s: {result['images_per_s']:.1f}")
        print(f"cpu ms/image: {result['cpu_ms_per_image']:.2f}")
        print(f"images/s per core: {result['images_per_s_per_core']:.1f}")
        print(f"load average (1 min): {result['load_average_1min']:.2f} on {os.cpu_count()} cores")
        if args.json:
            print(json.dumps(result))
        return 0
    try:
        dataset = data.get_dataset(args.dataset, args.root, workdir=args.workdir, check_images=args.check_images,
                                   skip_bad_images=args.skip_bad_images, **options)
    except data.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(data.describe(dataset), indent=1))
    if dataset.skipped:
        print(f"skipped {len(dataset.skipped)} bad image(s):", file=sys.stderr)
        for path, origin, reason in dataset.skipped:
            print(f"  {path} ({origin}): {reason}", file=sys.stderr)
    if dataset.excluded:
        print(f"excluded {len(dataset.excluded)} image(s) by the split rule, e.g. {dataset.excluded[0][2]}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
