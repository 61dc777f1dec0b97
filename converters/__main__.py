"""python -m converters CHECKPOINT OUTPUT_DIR --model NAME [--config CONFIG.json] [--linear-head HEAD.pth]"""

from __future__ import annotations

import argparse
import difflib
import json
import sys

from medjax.convert import CONVERTERS, CheckpointError, convert
from medjax.models import VARIANTS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m converters",
        description="Convert an official PyTorch / transformers / open_clip checkpoint into medjax Flax parameters.",
        epilog=f"Known variants: {', '.join(sorted(VARIANTS))}. Families (with --config): "
               f"{', '.join(sorted(CONVERTERS))}.")
    parser.add_argument("checkpoint", help="checkpoint file (.pth/.pt/.bin/.safetensors) or a transformers folder")
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
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"output_dir": args.output_dir, "family": meta["family"], "format": meta["source"]["format"],
                      "num_params": meta["num_params"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
