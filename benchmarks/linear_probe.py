"""Feature-cached linear probe vs re-running the frozen backbone every epoch (SPEC section 8, issue 7).

    python benchmarks/linear_probe.py [--num 320] [--image-size 84] [--arch small|tiny] [--params DIR]
                                      [--epochs 10] [--root DIR]

Both sides train the same grid of 16 linear heads (n last blocks {1, 4} x avgpool x 4 lrs, SGD momentum 0.9, cosine,
batch 128) for `--epochs` epochs on the train split of synthetic APTOS-layout data (written by `medjax.data.fake`
unless --root is given), read through medjax's grain loader with the eval transforms:
- cached (medjax.protocols): one backbone pass over the split (`features.extract`), then the whole head training as
  one jitted scan over the cached features (`linear_probe.train_heads`);
- baseline: every epoch reads and decodes the images again and runs the frozen backbone on each batch, fused in one
  jitted function with the same SGD step of the same heads (`linear_probe.make_sgd_step`).
Compilation is excluded on both sides (each is compiled before its timed run; the head training's first call, which
compiles, is reported separately).
The backbone is a DINOv2 ViT-S/14 with random weights (`--arch small`; `tiny`: the test fixture's size) or a
converted checkpoint (`--params`). Prints one JSON line: the wall time of each side, its parts, and the ratio
baseline / cached. The machine may be shared: the load average is reported with the times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ARCHS = {"small": dict(width=384, depth=12, num_heads=6, mlp_hidden=1536),
         "tiny": dict(width=48, depth=2, num_heads=3, mlp_hidden=192)}


def backbone(args, ds):
    import jax
    import jax.numpy as jnp

    from medjax import models
    from medjax.models.vit import ViTConfig
    from medjax.protocols import features

    if args.params:
        return features.load_backbone_for(args.params, ds)
    grid = args.image_size // 14
    config = ViTConfig(family="dinov2", patch_size=14, pos_grid=(grid, grid), layerscale=True,
                       pos_resize="offset", pos_resize_offset=0.1, in_chans=ds.channels,
                       **ARCHS[args.arch])
    model = models.build_backbone(config)
    dummy = jnp.zeros((1, args.image_size, args.image_size, ds.channels), jnp.float32)
    return config, jax.jit(model.init)(jax.random.PRNGKey(0), dummy)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=320, help="synthetic images (70%% form the train split)")
    p.add_argument("--image-size", type=int, default=84, help="backbone input (a multiple of 14)")
    p.add_argument("--arch", default="small", choices=sorted(ARCHS))
    p.add_argument("--params", default="", help="a converted backbone instead of --arch")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--root", default="", help="existing APTOS-layout data (default: write synthetic data)")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from medjax.data import fake, get_dataset, make_loader
    from medjax.protocols import features, linear_probe

    tmp = tempfile.mkdtemp(prefix="medjax_probe_bench_")
    root = args.root or fake.write("aptos2019", os.path.join(tmp, "aptos"), args.num, seed=0, size=128)["root"]
    ds = get_dataset("aptos2019", root)
    n_train = len(ds.splits["train"])
    config, variables = backbone(args, ds)
    nb = min(4, features.blocks_available(config))
    heads, _ = linear_probe.head_grid((1, 4), max_blocks=nb)
    feature_fn = features.make_feature_fn(config, nb)
    k = ds.num_classes

    loader = lambda: make_loader(ds, "train", batch_size=args.batch_size, image_size=args.image_size,  # noqa: E731
                                 train=False, shard_index=0, shard_count=1)
    warm = next(iter(loader()))

    # ---- cached: one backbone pass, then the heads on the features (compiled first: extract's jax.jit(feature_fn)
    # and train_heads' scan are cached per function and shape, so the timed calls run compiled code)
    jax.block_until_ready(jax.jit(feature_fn)(variables, warm["image"]))
    t0 = time.perf_counter()
    feats = features.extract(feature_fn, variables, ds, "train", image_size=args.image_size, batch_size=args.batch_size)
    t_extract = time.perf_counter() - t0
    x = linear_probe.full_input(feats)
    train = lambda: linear_probe.train_heads(x, feats.labels, ds.task, k, heads, nb, feats.dim,  # noqa: E731
                                             epochs=args.epochs, batch_size=args.batch_size)
    t1 = time.perf_counter()
    trained = train()  # first call: compiles
    t_heads_compile = time.perf_counter() - t1
    t1 = time.perf_counter()
    trained = train()
    t_heads = time.perf_counter() - t1
    t_cached = t_extract + t_heads

    # ---- baseline: the backbone on every batch of every epoch, fused with the same SGD step
    steps_per_epoch = -(-n_train // args.batch_size)
    masks = trained["masks"]
    step = linear_probe.make_sgd_step(heads, masks, ds.task, args.epochs * steps_per_epoch)

    @jax.jit
    def fused(variables, carry, images, labels, weights):
        f = feature_fn(variables, images)
        x = jnp.concatenate([f["cls"].reshape(len(images), -1), f["patch_mean"]], axis=1)
        return step(carry, (x, labels, weights))

    init = linear_probe.init_heads(heads, masks, k, 0)
    carry = (init, jax.tree_util.tree_map(np.zeros_like, init), jnp.zeros((), jnp.int32))
    # compile before timing
    jax.block_until_ready(fused(variables, carry, warm["image"], warm["label"], warm["mask"].astype(np.float32)))
    t2 = time.perf_counter()
    epoch_times = []
    for _ in range(args.epochs):
        te = time.perf_counter()
        for batch in loader():
            carry = fused(variables, carry, batch["image"], batch["label"], batch["mask"].astype(np.float32))
        jax.block_until_ready(carry)
        epoch_times.append(time.perf_counter() - te)
    t_baseline = time.perf_counter() - t2

    result = {
        "backbone": args.params or f"dinov2 {args.arch} (random weights)", "image_size": args.image_size,
        "train_images": n_train, "heads": len(heads), "epochs": args.epochs, "batch_size": args.batch_size,
        "device": str(jax.devices()[0].platform), "cpu_count": os.cpu_count(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "cached_s": round(t_cached, 3), "cached_extract_s": round(t_extract, 3),
        "cached_head_training_s": round(t_heads, 3), "head_training_first_call_s": round(t_heads_compile, 3),
        "baseline_s": round(t_baseline, 3), "baseline_epoch_s": [round(v, 3) for v in epoch_times],
        "ratio_baseline_over_cached": round(t_baseline / t_cached, 2),
    }
    print(json.dumps(result))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
