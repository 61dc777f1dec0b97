"""python -m converters CHECKPOINT OUTPUT_DIR --model NAME [--config CONFIG.json] [--linear-head HEAD.pth]
python -m converters fetch NAME... [--from-file PATH]... [--keep-download]
python -m converters list"""

from __future__ import annotations

import argparse
import difflib
import json
import sys

from medjax.convert import CONVERTERS, CheckpointError, convert
from medjax.errors import UserError, cli_main
from medjax.models import VARIANTS
from medjax.weights import fetch as weights
from medjax.weights import registry


def _convert(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m converters",
        description="Convert an official PyTorch / transformers / open_clip checkpoint, or a fine-tuned model with "
                    "its trained head, into medjax Flax parameters. Other commands: `fetch NAME...` (official "
                    "weights by name), `list`.",
        epilog=f"Known variants: {', '.join(sorted(VARIANTS))}. Families (with --config): "
               f"{', '.join(sorted(CONVERTERS))}.")
    parser.add_argument("checkpoint", help="checkpoint file (.pth/.pt/.bin/.safetensors, or a training checkpoint "
                                           "without extension) or a transformers folder")
    parser.add_argument("output_dir", help="folder to write params.safetensors and medjax.json into")
    parser.add_argument("--model", required=True, help="a known variant name or a family name")
    parser.add_argument("--config", help="JSON of the upstream constructor's keyword arguments, an open_clip model "
                                         "config, or a transformers config.json")
    parser.add_argument("--dinov2-resize", choices=("auto", "official", "transformers"), default="auto",
                        help="DINOv2 run-time pos-embed resize: as the file's implementation does (auto), or forced")
    parser.add_argument("--linear-head", metavar="FILE",
                        help="DINOv2 only: the hub's ImageNet linear classifier for this backbone "
                             "(dinov2_vit*14[_reg4]_linear_head.pth or _linear4_head.pth); stored as lc_head/* and "
                             "run by medjax.embed as lc_linear_input / lc_logits")
    parser.add_argument("--ema", action="store_true",
                        help="use the EMA weights (`model_ema`) of a checkpoint that holds both")
    args = parser.parse_args(argv)
    if args.model not in VARIANTS and args.model not in CONVERTERS:
        close = difflib.get_close_matches(args.model, list(VARIANTS) + list(CONVERTERS), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        print(f"error: unknown --model {args.model!r}; {hint}known variants: {', '.join(sorted(VARIANTS))}; or a "
              f"family name ({', '.join(sorted(CONVERTERS))}) with --config", file=sys.stderr)
        return 2
    try:
        meta = convert(args.checkpoint, args.output_dir, args.model, args.config, dinov2_resize=args.dinov2_resize,
                       ema=args.ema, linear_head=args.linear_head)
    except (CheckpointError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    head = meta.get("trained_head")
    print(json.dumps({"output_dir": args.output_dir, "family": meta["family"], "format": meta["source"]["format"],
                      "num_params": meta["num_params"],
                      **({"trained_head": head} if head else {})}))
    return 0


def _fetch(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m converters fetch",
        description="Download, verify, convert and cache official weights by name (`python -m converters list`). "
                    "The last line printed is each converted folder's path. MEDJAX_HOME: the cache (default "
                    "~/.cache/medjax); MEDJAX_MIRROR=URL: fetch https://HOST/PATH as URL/HOST/PATH; MEDJAX_OFFLINE=1 "
                    "(or HF_HUB_OFFLINE=1): never use the network.")
    parser.add_argument("names", nargs="+", metavar="NAME")
    parser.add_argument("--from-file", action="append", default=[], metavar="PATH",
                        help="a file of NAME downloaded by hand (repeat for a source of several files): checked and "
                             "converted like a download; needs a single NAME")
    parser.add_argument("--url", metavar="URL",
                        help="download NAME's checkpoint from this address instead of the registry's: the link a "
                             "publisher sends once its licence is accepted (DINOv3); needs a single NAME")
    parser.add_argument("--keep-download", action="store_true", help="keep the downloaded file(s) in the cache")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    if (args.from_file or args.url) and len(args.names) != 1:
        print(f"error: {'--from-file' if args.from_file else '--url'} goes with a single NAME", file=sys.stderr)
        return 2
    folders = []
    try:
        for name in args.names:
            folders.append(weights.fetch(name, from_files=args.from_file, keep_download=args.keep_download,
                                         quiet=args.quiet, url=args.url))
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for folder in folders:
        print(folder)
    return 0


def table_rows() -> list[tuple[str, str, str, str, str]]:
    """(name, family, source, size, licence) for every registry name."""
    rows = []
    for name, s in registry.sources().items():
        family = VARIANTS[s.model][0] if s.model in VARIANTS else "?"
        rows.append((name, family, s.checkpoint.url, f"{s.size / 1e6:,.0f} MB", s.licence))
    return rows


def _list(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m converters list",
                                     description="Every official weights name: family, source, size, licence, cached.")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    for name, family, where, size, licence in table_rows():
        folder = weights.cached(name)
        if args.json:
            print(json.dumps({"name": name, "family": family, "source": where, "size": size, "licence": licence,
                              "cached": folder}))
        else:
            print(f"{name:48s} {family:10s} {size:>9s}  {licence:14s} {'cached' if folder else '-':6s}  {where}")
    return 0


@cli_main
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "fetch":
        return _fetch(argv[1:])
    if argv and argv[0] == "list":
        return _list(argv[1:])
    return _convert(argv)


if __name__ == "__main__":
    sys.exit(main())
