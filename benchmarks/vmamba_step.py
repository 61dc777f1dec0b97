"""Forward + backward step time and memory of a VMamba backbone (random weights) on the default JAX device.

    python benchmarks/vmamba_step.py [--variant vmamba_small] [--batch 8] [--size 224] [--steps 2] [--scan-chunk 64]

The step is what fine-tuning runs: medjax's classifier (backbone -> linear head, 1000 classes) -> the engine's
softmax cross-entropy, gradients for every parameter (no optimizer update). Printed: compile time, per-step times,
images/s, XLA's planned memory for the step (arguments + outputs + temporaries, from the compiled executable) and the
process's peak RSS. The PyTorch reference is not timed: upstream VMamba needs its own package (timm, fvcore, triton)
and on CPU its selective scan is a Python loop over the sequence (`selective_scan_torch`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._common import peak_rss_gib  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="vmamba_small", choices=("vmamba_small", "vmamba_base"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--scan-chunk", default="64", help="positions per parallel scan step; 'none' = whole sequence")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    parser.add_argument("--forward-only", action="store_true")
    args = parser.parse_args(argv)

    from medjax import classifier, engine, models
    from medjax.models import VARIANTS
    from medjax.models.vmamba.convert import vssm_config
    from medjax.schema import make

    chunk = None if args.scan_chunk.lower() == "none" else int(args.scan_chunk)
    config = dataclasses.replace(vssm_config(VARIANTS[args.variant][1]), scan_chunk=chunk, img_size=args.size)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    model_cfg = make({"model.family": config.family, "model.architecture": config.to_dict()}).model
    model, variables = classifier.build_classifier(model_cfg, 1000, config.in_chans, args.size, jax.random.key(0),
                                                   dtype)
    params = jax.device_put(variables["params"])  # on the device once, not with every step
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(args.batch, args.size, args.size, config.in_chans)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 1000, size=args.batch))

    def loss_fn(p, x, y):
        return engine.loss_fn(model.apply({"params": p}, x), y, "multiclass")  # VMamba: parameters only

    step = jax.jit(loss_fn if args.forward_only else jax.value_and_grad(loss_fn))
    t0 = time.perf_counter()
    compiled = step.lower(params, images, labels).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(params, images, labels))  # warm-up
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, images, labels))
        times.append(time.perf_counter() - t0)
    mem = compiled.memory_analysis()
    planned = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    result = {
        "variant": args.variant, "params_backbone": models.count_params(params["backbone"]),
        "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(), "batch": args.batch, "size": args.size,
        "dtype": args.dtype, "scan_chunk": chunk, "step": "forward" if args.forward_only else "forward+backward",
        "compile_s": round(compile_s, 1), "step_s": [round(t, 3) for t in times],
        "median_step_s": round(float(np.median(times)), 3),
        "images_per_s": round(args.batch / float(np.median(times)), 2),
        "xla_planned_memory_gib": round(planned / 2 ** 30, 2),
        "xla_temp_memory_gib": round(mem.temp_size_in_bytes / 2 ** 30, 2),
        "peak_rss_gib": round(peak_rss_gib(), 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
