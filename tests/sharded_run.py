"""Worker for tests/test_sharding.py: trains a tiny classifier for a few steps on fixed batches with a given mesh
and prints the losses as JSON. Run in a fresh process so XLA_FLAGS / jax.distributed take effect."""

import json
import sys

import jax
import numpy as np


def main(mesh_data: int, mesh_fsdp: int, process_id: int = 0, num_processes: int = 1, port: int = 0):
    if num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"localhost:{port}", num_processes, process_id)
    from medjax import engine, sharding
    from medjax.schema import make

    arch = {"family": "dinov2", "width": 128, "depth": 2, "num_heads": 4, "patch_size": 8, "pos_grid": [4, 4],
            "mlp_hidden": 256, "layerscale": True}
    config = make({"model.family": "dinov2", "model.architecture": arch, "model.freeze": "full",
                   "compute_dtype": "float32", "image_size": 32, "optim.lr": 1e-3, "optim.weight_decay": 1e-4,
                   "mesh.data": mesh_data, "mesh.fsdp": mesh_fsdp})  # the reference warm-up schedule, clipping 1.0
    e = engine.build(config, num_classes=5, channels=3, task="multiclass", total_steps=6, warmup_steps=2)
    state, step, mesh = e.state, e.train_step, e.mesh
    rng = np.random.default_rng(0)
    losses = []
    per_process = 16 // num_processes
    with jax.default_matmul_precision("float32"):
        for _ in range(6):
            images = rng.standard_normal((16, 32, 32, 3)).astype(np.float32)
            labels = rng.integers(0, 5, 16).astype(np.int32)
            local = slice(process_id * per_process, (process_id + 1) * per_process)
            batch = sharding.global_batch({"image": images[local], "label": labels[local]}, mesh)
            state, out = step(state, batch)
            losses.append(float(out["loss"]))
    kernel = state.params["backbone"]["blocks_0"]["mlp"]["fc1"]["kernel"]
    shard_shapes = sorted({tuple(s.data.shape) for s in kernel.addressable_shards})
    final = float(jax.jit(lambda p: sum(jax.numpy.sum(x ** 2) for x in jax.tree_util.tree_leaves(p)))(state.params))
    print(json.dumps({"losses": losses, "devices": jax.device_count(), "fc1_shards": shard_shapes,
                      "param_sq_sum": final}))


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
