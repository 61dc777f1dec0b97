"""Regenerate a dinov3 fixture from upstream (transformers' DINOv3ViTModel), like tests/fixtures/dinov3:

    python -m medjax.models.dinov3.make_fixture OUT_DIR [--gated] [--seed 5100] [--height 32 --width 32]

writes OUT_DIR/config.json (the model's config plus `family`, `format`, `upstream` and a `fixture` block),
model.safetensors (save_pretrained: the Hugging Face layout of the released checkpoints), images.npy (float32 NCHW,
torch.randn from generator seed + 2) and expected.npz (`last_hidden_state`, `pooler_output` in eval mode, CPU, sdpa).
The constructor runs under torch.manual_seed(seed); then every tensor of the state dict is perturbed (seed + 1): std
0.5 / sqrt(fan_in) for weight matrices and kernels, 0.5 for the cls / register / mask tokens, 0.1 for the rest
(biases, norms, LayerScale). Needs torch and transformers; not run in CI (the tests read the committed fixture).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
import transformers

PLAIN = dict(hidden_size=48, num_attention_heads=3, num_hidden_layers=2, intermediate_size=192, patch_size=8,
             num_register_tokens=4, layerscale_value=0.5, rope_theta=100.0)
GATED = dict(PLAIN, intermediate_size=128, use_gated_mlp=True, hidden_act="silu")


def perturb(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if any(s in name for s in ("cls_token", "register_tokens", "mask_token")):
                std = 0.5
            elif name.endswith("weight") and t.ndim >= 2:
                std = 0.5 / np.sqrt(t[0].numel())
            else:
                std = 0.1
            t.add_(torch.randn(t.shape, generator=gen) * std)


def make(out: str, gated: bool, seed: int, height: int, width: int) -> None:
    kwargs = dict(GATED if gated else PLAIN, image_size=height)
    torch.manual_seed(seed)
    model = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**kwargs, attn_implementation="sdpa"))
    save(model, out, "dinov3", "transformers.DINOv3ViTModel(config)", seed, height, width,
         {"attn_implementation": "sdpa", "note": "gated (SwiGLU) MLP" if gated else "plain MLP"})


def save(model, out: str, family: str, entry: str, seed: int, height: int, width: int, notes: dict | None = None):
    """Perturb the upstream model (seed + 1), run it on seeded images (seed + 2) and write the fixture folder:
    save_pretrained's files, images.npy, expected.npz and config.json with the fixture's provenance."""
    perturb(model, seed + 1)
    model.eval()
    images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        o = model(pixel_values=images)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    np.save(os.path.join(out, "images.npy"), images.numpy())
    np.savez(os.path.join(out, "expected.npz"), last_hidden_state=o.last_hidden_state.numpy(),
             pooler_output=o.pooler_output.numpy())
    path = os.path.join(out, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update({"family": family, "format": "transformers",
                   "upstream": {"entry": entry, "package": "transformers",
                                "version": transformers.__version__, "torch": torch.__version__},
                   "fixture": {"seed": seed, "perturb_seed": seed + 1, "image_seed": seed + 2,
                               "images_shape": [2, 3, height, width], "call": "o = model(pixel_values=images)",
                               "outputs": ["last_hidden_state", "pooler_output"], **(notes or {})}})
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medjax.models.dinov3.make_fixture", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--gated", action="store_true", help="the gated (SwiGLU) MLP of ViT-S+/H+/7B")
    parser.add_argument("--seed", type=int, default=5100)
    parser.add_argument("--height", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    args = parser.parse_args(argv)
    make(args.out_dir, args.gated, args.seed, args.height, args.width)
    return 0


if __name__ == "__main__":
    sys.exit(main())
