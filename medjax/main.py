"""python -m medjax.main --workdir DIR

The main job. Until the training engine lands, it runs the embedded default end to end with nothing downloaded:
convert the bundled tiny DINOv2 checkpoint (official torch.hub format, random perturbed weights), embed the bundled
images with it, and compare every output with the upstream PyTorch implementation's recorded outputs.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

ASSET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny_dinov2")

flags.DEFINE_string("workdir", "/tmp/medjax_demo", "where the converted parameters and outputs are written")
FLAGS = flags.FLAGS


def run_demo(workdir: str) -> dict:
    import numpy as np

    import converters
    from medjax.embed import embed

    params_dir = os.path.join(workdir, "tiny_dinov2")
    meta = converters.convert(os.path.join(ASSET, "checkpoint.pth"), params_dir, "dinov2",
                              os.path.join(ASSET, "config.json"))
    outputs = embed(params_dir, np.load(os.path.join(ASSET, "images.npy")))
    np.savez(os.path.join(workdir, "embeddings.npz"), **outputs)
    expected = np.load(os.path.join(ASSET, "expected.npz"))
    diffs = {k: float(np.abs(outputs[k] - expected[k]).max()) for k in expected.files if k in outputs}
    return {"params_dir": params_dir, "num_params": meta["num_params"],
            "outputs": {k: list(v.shape) for k, v in outputs.items()}, "max_abs_diff_vs_pytorch": diffs}


def main(argv):
    del argv
    summary = run_demo(FLAGS.workdir)
    print(json.dumps(summary, indent=2))
    worst = max(summary["max_abs_diff_vs_pytorch"].values())
    if worst > 2e-5:
        print(f"error: medjax differs from the PyTorch reference by {worst:.3g}", file=sys.stderr)
        return 1
    print(f"OK: every output within {worst:.2g} of upstream PyTorch DINOv2")
    return 0


if __name__ == "__main__":
    app.run(main)
