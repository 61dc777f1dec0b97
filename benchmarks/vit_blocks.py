"""Ablations of two automatic choices of medjax's ViT step, forward + backward on the default JAX device.

    python benchmarks/vit_blocks.py blocks [--depth 12] [--tokens 197]      # residual-gradient barrier on / off
    python benchmarks/vit_blocks.py attention [--tokens 197]               # head-major vs jax.nn.dot_product_attention

`blocks`: `depth` ViT-B blocks (width 768, 12 heads, MLP 3072) on (8, tokens, 768), gradient of sum(out**2), with
`vit._materialize_cotangent` as built and replaced by the identity. `attention`: softmax(q k^T / sqrt(d)) v on
(8, tokens, 3, 12, 64) qkv in the two layouts. Median of `--repeats` timed runs after two untimed ones.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import median_seconds  # noqa: E402


def blocks(args):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from medjax.models.vit import model as vit  # the module itself: the barrier is swapped where apply_blocks reads it

    config = vit.ViTConfig(family="mae", width=768, depth=args.depth, num_heads=12, patch_size=16, pos_grid=(14, 14),
                           mlp_hidden=3072)

    class Blocks(nn.Module):
        @nn.compact
        def __call__(self, x):
            return vit.apply_blocks(config, x)

    model = Blocks()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, args.tokens, 768)), jnp.float32)
    params = model.init(jax.random.PRNGKey(0), x)
    built = vit._materialize_cotangent
    for name, barrier in (("with the barrier (medjax)", built), ("without the barrier", lambda t: t)):
        vit._materialize_cotangent = barrier
        grad = jax.jit(jax.grad(lambda p, x: jnp.sum(model.apply(p, x) ** 2)))
        ms = 1e3 * median_seconds(lambda: jax.block_until_ready(grad(params, x)), args.repeats)
        print(f"{args.depth} blocks, {args.tokens} tokens, {name}: {ms / 1e3:.3f} s")
    vit._materialize_cotangent = built


def attention(args):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from medjax.models import layers

    t = args.tokens
    rng = np.random.default_rng(0)
    qkv = jnp.asarray(rng.standard_normal((8, t, 3, 12, 64)), jnp.float32)
    weight = jnp.asarray(rng.standard_normal((8, t, 768)), jnp.float32)

    def tokens_major(qkv):
        q, k, v = jnp.moveaxis(qkv, 2, 0)
        return jax.nn.dot_product_attention(q, k, v).reshape(8, t, 768)

    def heads_major(qkv):
        q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))
        return jnp.transpose(layers.head_major_attention(q, k, v), (0, 2, 1, 3)).reshape(8, t, 768)

    for name, fn in (("jax.nn.dot_product_attention", tokens_major), ("head_major_attention (medjax)", heads_major)):
        grad = jax.jit(jax.grad(lambda a: jnp.sum(fn(a) * weight)))
        ms = 1e3 * median_seconds(lambda: grad(qkv).block_until_ready(), args.repeats)
        print(f"{t} tokens, {name}: forward + backward {ms:.1f} ms")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("blocks", "attention"))
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--tokens", type=int, default=197)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    (blocks if args.what == "blocks" else attention)(args)


if __name__ == "__main__":
    main()
