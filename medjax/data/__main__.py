"""python -m medjax.data fake|describe|options

  fake      --dataset NAME --root DIR --num N [--seed S] [--size PX]   write a synthetic dataset in the public layout
  describe  --dataset NAME --root DIR [--option KEY=VALUE ...]         print the splits as read, as JSON
  options   [--dataset NAME]                                           the data options: default and help, as JSON

describe prints {"dataset": NAME, "splits": {"train": {"images": N, "labels": {CLASS: COUNT}, "patients": N or
null}, "val": ..., "test": ...}} to stdout (label counts are positives per class for multi-label sets); skipped
images (with --skip-bad-images) are reported on stderr. Bad input exits 2 with the file and row.
"""

from __future__ import annotations

import argparse
import json
import sys

from medjax import data
from medjax.data import fake


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


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
    d.add_argument("--dataset", required=True, choices=sorted(data.READERS))
    d.add_argument("--root", required=True)
    d.add_argument("--seed", type=int, default=None, help="split seed (default: the reader's)")
    d.add_argument("--workdir", help="also write the split file to WORKDIR/splits/NAME.json")
    d.add_argument("--check-images", choices=data.CHECKS, default="verify",
                   help="start-up image check (default verify: every image exists and is intact)")
    d.add_argument("--skip-bad-images", action="store_true")
    d.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="reader option, value as JSON or a string, e.g. uncertain=ones, frontal_only=true")
    o = sub.add_parser("options", help="print each dataset's data options (default, help) as JSON")
    o.add_argument("--dataset", choices=sorted(data.READERS))
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
            print(f"error: {e.filename or args.root}: cannot write ({e.strerror or e})", file=sys.stderr)
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
