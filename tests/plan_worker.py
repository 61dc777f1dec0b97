"""Worker for tests/test_plan.py: the trainer's steps (medjax.engine.build, real state and batch, as
medjax.train.Trainer builds and calls them) and the plan's steps (medjax.plan, shapes only) lowered on the same CPU
mesh; prints whether their HLO texts agree. Run in a fresh process so that XLA_FLAGS takes effect."""

import json
import sys

import jax
import numpy as np

from medjax import engine, plan, sharding
from medjax.schema import make

ARCH = {"family": "dinov2", "width": 64, "depth": 2, "num_heads": 4, "patch_size": 8, "pos_grid": [4, 4],
        "mlp_hidden": 128, "layerscale": True}


def config(data: int, fsdp: int, dtype: str):
    return make({"dataset": "chexpert", "model.family": "dinov2", "model.architecture": ARCH, "model.freeze": "full",
                 "compute_dtype": dtype, "image_size": 32, "batch_size": 16, "mesh.data": data, "mesh.fsdp": fsdp})


def trainer_texts(c):
    """As the trainer: engine.build over every device, a real batch through sharding.global_batch."""
    e = engine.build(c, num_classes=14, channels=1, task="multilabel", total_steps=1000, warmup_steps=0,
                     mesh=sharding.make_mesh(c.mesh.data, c.mesh.fsdp))
    rng = np.random.default_rng(0)
    batch = sharding.global_batch({"image": rng.standard_normal((16, 32, 32, 1)).astype(np.float32),
                                   "label": (rng.random((16, 14)) > 0.5).astype(np.float32),
                                   "mask": np.ones(16, bool)}, e.mesh)
    train = e.train_step.lower(e.state, batch).as_text()
    images = sharding.global_batch({"image": np.asarray(batch["image"])}, e.mesh)["image"]
    return train, e.eval_step.lower(e.variables_of(e.state), images).as_text()


def plan_texts(c):
    e = plan.build_engine(c, jax.devices(), num_classes=14, channels=1, task="multilabel")
    train, ev = plan.lower_steps(e, c, 16, 1, "multilabel", 14)
    return train.as_text(), ev.as_text()


def main(data: int, fsdp: int):
    c = config(data, fsdp, "bfloat16")
    trainer, planned = trainer_texts(c), plan_texts(c)
    other = plan_texts(config(fsdp, data, "bfloat16"))  # the other mesh: the comparison can tell steps apart
    print(json.dumps({"devices": jax.device_count(), "train_equal": trainer[0] == planned[0],
                      "eval_equal": trainer[1] == planned[1], "train_chars": len(trainer[0]),
                      "other_mesh_differs": other[0] != planned[0]}))


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
