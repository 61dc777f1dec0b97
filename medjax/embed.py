"""python -m medjax.embed --params DIR --images X.npy --output Y.npz

Runs a converted backbone on NCHW float32 images (already normalised, as PyTorch users hold them) and writes its
outputs under the upstream names, plus `linear_head_input` and `attention_head_input`, and `logits` when the folder
holds a trained head (a fine-tuned model converted with its head, or a `medjax.export` folder).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from medjax import finetuned, models
from medjax.errors import cli_main


def embed(params_dir: str, images: np.ndarray, batch_size: int = 32, precision: str = "float32") -> dict:
    config, variables, meta = models.load_pretrained(params_dir)
    if images.ndim != 4 or images.shape[1] != config.in_chans:
        raise ValueError(f"images must be NCHW with {config.in_chans} channels, got shape {images.shape}")
    model = models.build_backbone(config)
    apply = jax.jit(lambda v, x: model.apply(v, jnp.transpose(x, (0, 2, 3, 1))))  # eval mode: stored statistics
    chunks = []
    with jax.default_matmul_precision(precision):
        for start in range(0, len(images), batch_size):
            out = apply(variables, jnp.asarray(images[start:start + batch_size], jnp.float32))
            chunks.append(jax.tree_util.tree_map(np.asarray, out))
    outputs = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    logits = finetuned.head_logits(params_dir, meta, outputs)
    if logits is not None:
        outputs["logits"] = logits
    return outputs


@cli_main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medjax.embed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", required=True, help="folder written by `python -m converters`")
    parser.add_argument("--images", required=True, help=".npy float32 array (N, C, H, W)")
    parser.add_argument("--output", required=True, help=".npz to write")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="float32", choices=("float32", "tensorfloat32", "bfloat16"),
                        help="matmul precision (float32 reproduces PyTorch float32 numbers)")
    args = parser.parse_args(argv)
    try:
        images = np.load(args.images, allow_pickle=False)
        outputs = embed(args.params, images, args.batch_size, args.precision)
    except (FileNotFoundError, ValueError) as e:  # UserError (a damaged folder) is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    np.savez(args.output, **outputs)
    print(" ".join(f"{k}{tuple(v.shape)}" for k, v in outputs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
