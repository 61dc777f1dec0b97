"""Regenerate a dinov3_convnext fixture from upstream (transformers' DINOv3ConvNextModel), like
tests/fixtures/dinov3_convnext:

    python -m medjax.models.dinov3_convnext.make_fixture OUT_DIR [--seed 5200] [--height 64 --width 64]

writes config.json (plus `family`, `format`, `upstream`, `fixture`), model.safetensors (save_pretrained), images.npy
(float32 NCHW, torch.randn from generator seed + 2) and expected.npz (`last_hidden_state`, `pooler_output`, eval mode,
CPU), with the dinov3 fixture's perturbation recipe (`medjax.models.dinov3.make_fixture.perturb`, seed + 1). Needs
torch and transformers; not run in CI.
"""

from __future__ import annotations

import argparse
import sys

import torch
import transformers

from medjax.models.dinov3.make_fixture import save

TINY = dict(hidden_sizes=[16, 24, 32, 40], depths=[1, 1, 2, 1])


def make(out: str, seed: int, height: int, width: int) -> None:
    torch.manual_seed(seed)
    model = transformers.DINOv3ConvNextModel(transformers.DINOv3ConvNextConfig(**TINY))
    save(model, out, "dinov3_convnext", "transformers.DINOv3ConvNextModel(config)", seed, height, width)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medjax.models.dinov3_convnext.make_fixture", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=5200)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    args = parser.parse_args(argv)
    make(args.out_dir, args.seed, args.height, args.width)
    return 0


if __name__ == "__main__":
    sys.exit(main())
