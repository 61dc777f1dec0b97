"""Regenerate a SigLIP fixture (golden upstream outputs) with transformers; not run in CI.

    python -m medjax.models.siglip.make_fixture OUT_DIR [--seed 5300] [--size 32] [--no-head] ...

Writes, as tests/fixtures/siglip/ holds them: `config.json` (the SiglipVisionConfig's fields plus `family`, `format`,
`upstream` and a `fixture` block), `model.safetensors` (`save_pretrained`), `images.npy` (float32 NCHW,
`torch.randn` from generator seed + 2) and `expected.npz` (`last_hidden_state`, `pooler_output` of
`model(pixel_values=images)` in eval mode, CPU, float32, sdpa attention). The model is built under
`torch.manual_seed(seed)`, then every floating tensor is perturbed (generator seed + 1): std 0.5 / sqrt(fan_in) for
weight matrices and kernels, 0.5 for the position embeddings, 0.1 for everything else (biases, norms, the probe).
The defaults reproduce the public fixture bit for bit. Needs torch and transformers (`pip install medjax[torch]
transformers`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import numpy as np

from medjax.models.fixtures import perturb_


def make(out: str, seed: int = 5300, size: int = 32, batch: int = 2, width: int = 48, depth: int = 2, heads: int = 3,
         mlp: int = 192, patch: int = 8, use_head: bool = True, act: str = "gelu_pytorch_tanh") -> dict:
    import safetensors
    import torch
    import transformers

    config = transformers.SiglipVisionConfig(
        hidden_size=width, intermediate_size=mlp, num_hidden_layers=depth, num_attention_heads=heads, patch_size=patch,
        image_size=size, hidden_act=act, vision_use_head=use_head, attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = transformers.SiglipVisionModel(config).eval()
    perturb_(model, seed + 1)
    images = torch.randn((batch, 3, size, size), generator=torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        o = model(pixel_values=images)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    np.save(os.path.join(out, "images.npy"), images.numpy())
    expected = {"last_hidden_state": o.last_hidden_state.numpy()}
    if use_head:
        expected["pooler_output"] = o.pooler_output.numpy()
    np.savez(os.path.join(out, "expected.npz"), **expected)
    versions = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                "transformers": transformers.__version__, "safetensors": safetensors.__version__}
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    cfg.update({
        "family": "siglip", "format": "transformers",
        "upstream": {"package": "transformers", "version": transformers.__version__,
                     "entry": "transformers.SiglipVisionModel(config)", "versions": versions},
        "fixture": {"seed": seed, "perturb_seed": seed + 1, "image_seed": seed + 2,
                    "images_shape": list(images.shape), "attn_implementation": "sdpa",
                    "call": "o = model(pixel_values=images)", "outputs": sorted(expected),
                    "note": "SigLIP vision tower" + (" with its attention-pooling (MAP) head" if use_head else "")}})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    return cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=5300)
    p.add_argument("--size", type=int, default=32, help="the config's image_size and the images' side")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--width", type=int, default=48)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--mlp", type=int, default=192)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--act", default="gelu_pytorch_tanh")
    p.add_argument("--no-head", action="store_true", help="vision_use_head=False")
    a = p.parse_args(argv)
    make(a.out, a.seed, a.size, a.batch, a.width, a.depth, a.heads, a.mlp, a.patch, not a.no_head, a.act)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
