"""Regenerate the vmamba fixture (tests/fixtures/vmamba) from the upstream VMamba code on CPU; not run in CI.

    python -m medjax.models.vmamba.make_fixture OUT_DIR --upstream VMAMBA_CHECKOUT [--seed 303] [--torchvision-shim]

VMAMBA_CHECKOUT is a checkout of github.com/MzeroMiko/VMamba @ 2ed52ead (the fixture's commit); its
`classification/models/vmamba.py` imports timm (1.0.31), fvcore (0.1.5.post20221221) and einops, and
`csm_triton.py` triton (3.9.0) when it is installed; they must be importable. timm imports torchvision: a CUDA build
of torchvision imports on a CPU-only torch after `--torchvision-shim`. No CUDA kernel is needed: without a
`selective_scan_cuda*` extension upstream's own `selective_scan_fn` runs its pure-torch `selective_scan_torch`, and
`cross_scan_fn` / `cross_merge_fn` run the torch `CrossScanF` / `CrossMergeF` for CPU tensors. One shim, as when the
fixture was made: those two functions enter `torch.cuda.device(x.device)`, which raises for a CPU tensor, so
`torch.cuda.device` of a CPU device is a no-op context while the script runs.

The recipe, as the fixture's README states it: `torch.manual_seed(seed)`, `VSSM(**CONFIG)` (upstream init); one
generator `torch.Generator().manual_seed(seed + 1)` walking the state_dict twice: first `A_logs`, `Ds` and
`dt_projs_bias` += N(0, 0.5), every other tensor with ndim >= 2 += N(0, 1 / sqrt(fan_in)) (fan_in the last dim for
`x_proj_weight` and `dt_projs_weight`, numel / shape[0] otherwise), every other tensor that is constant after init
(norms, zero biases) += N(0, 0.2), no draw for the rest; then every tensor += N(0, 0.02). Images: `torch.randn((2, 3,
96, 96))` from generator seed + 2. Outputs (forward hooks during `model(images)` in eval mode under
`torch.no_grad()`): `pooled_feature`, the input of `classifier.head`, and `last_stage_feature_map`, the output of
`layers[3]`.

Writes checkpoint.pth (`{'model': state_dict}`), config.json, images.npy and expected.npz; the README and
ARCHITECTURE.md are written by hand. Checked on an AVX-512 machine with torch 2.13.0+cpu and the versions above: the
images are bit for bit; of the checkpoint's 458,138 values 755 (0.16 %, in the 25 tensors whose upstream init draws
through a transcendental function: timm's erfinv-based `trunc_normal_` for the Linear2d / head weights, exp / log /
expm1 for `dt_projs_bias`) differ by one ulp, the other 457,383 are equal; hence the outputs differ by up to 5.5e-6
(1e-6 for `pooled_feature`). The committed fixture's own weights run here differ from its outputs by up to 4.8e-6 as
well: the machine that made it computed some float32 functions differently (no oneDNN, MKL or ATen CPU-capability
setting reproduced them).
"""

from __future__ import annotations

import contextlib
import os
import sys

import numpy as np
import torch

from medjax.errors import UserError, cli_main
from medjax.models.fixtures import fixture_main, import_upstream, seeded_images, versions, write_json

COMMIT = "2ed52ead062a51a64521ed3871d52914bf532876"
CONFIG = {"patch_size": 4, "in_chans": 3, "num_classes": 10, "depths": [1, 1, 2, 1], "dims": 16, "ssm_d_state": 1,
          "ssm_ratio": 2.0, "ssm_dt_rank": "auto", "ssm_act_layer": "silu", "ssm_conv": 3, "ssm_conv_bias": False,
          "ssm_drop_rate": 0.0, "ssm_init": "v0", "forward_type": "v05_noz", "mlp_ratio": 4.0,
          "mlp_act_layer": "gelu", "mlp_drop_rate": 0.0, "gmlp": False, "drop_path_rate": 0.0, "patch_norm": True,
          "norm_layer": "ln2d", "downsample_version": "v3", "patchembed_version": "v2", "use_checkpoint": False,
          "posembed": False, "imgsize": 224}


def rerandomize_(model, seed: int) -> None:
    """The fixture's two passes over the state_dict from one generator (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    with torch.no_grad():
        for name, t in state.items():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("A_logs", "Ds", "dt_projs_bias"):
                t.add_(torch.randn(t.shape, generator=gen) * 0.5)
            elif t.ndim >= 2:
                fan_in = t.shape[-1] if leaf in ("x_proj_weight", "dt_projs_weight") else t.numel() / t.shape[0]
                t.add_(torch.randn(t.shape, generator=gen) * (1.0 / np.sqrt(fan_in)))
            elif bool((t == t.flatten()[0]).all()):
                t.add_(torch.randn(t.shape, generator=gen) * 0.2)
        for t in state.values():
            t.add_(torch.randn(t.shape, generator=gen) * 0.02)


@contextlib.contextmanager
def cpu_device_shim():
    """`torch.cuda.device(<cpu device>)` as a no-op context (upstream's cross scan / merge enter it)."""
    original = torch.cuda.device

    def device(d):
        return contextlib.nullcontext() if torch.device(d).type == "cpu" else original(d)

    torch.cuda.device = device
    try:
        yield
    finally:
        torch.cuda.device = original


def make(out: str, upstream: str, seed: int = 303) -> None:
    classification = os.path.join(upstream, "classification")
    if not os.path.isdir(os.path.join(classification, "models")):
        raise UserError(f"{upstream!r} is not a VMamba checkout (no classification/models/ folder)")
    vmamba = import_upstream(classification, "models.vmamba")
    torch.manual_seed(seed)
    model = vmamba.VSSM(**CONFIG)
    rerandomize_(model, seed + 1)
    model.eval()
    images = seeded_images((2, 3, 96, 96), seed + 2)
    captured = {}
    hooks = [model.classifier.head.register_forward_pre_hook(
                 lambda m, args: captured.setdefault("pooled_feature", args[0])),
             model.layers[3].register_forward_hook(
                 lambda m, args, output: captured.setdefault("last_stage_feature_map", output))]
    with torch.no_grad(), cpu_device_shim():
        model(images)
    for h in hooks:
        h.remove()
    expected = {k: captured[k] for k in ("pooled_feature", "last_stage_feature_map")}
    os.makedirs(out, exist_ok=True)
    torch.save({"model": model.state_dict()}, os.path.join(out, "checkpoint.pth"))
    np.save(os.path.join(out, "images.npy"), images.numpy())
    np.savez(os.path.join(out, "expected.npz"), **{k: v.numpy() for k, v in expected.items()})
    config = {**CONFIG, "family": "vmamba",
              "format": 'torch.save({"model": state_dict}) of classification/models/vmamba.py:VSSM (channel-first '
                        "ln2d variant; Linear2d weights stored 2-D (out,in))",
              "upstream": {"repo": "github.com/MzeroMiko/VMamba", "commit": COMMIT,
                           "entry": "classification/models/vmamba.py::VSSM",
                           "cpu_shim": "torch.cuda.device(cpu) made a no-op context; selective scan = "
                                       "csms6s.selective_scan_torch and cross scan/merge = csm_triton.CrossScanF/"
                                       "CrossMergeF chosen by upstream dispatch (no CUDA/Triton kernels)",
                           "versions": versions("timm", "triton", "fvcore")},
              "fixture": {"seed": seed, "perturb_seed": seed + 1, "image_seed": seed + 2,
                          "images_shape": list(images.shape),
                          "call": "model.eval(); with torch.no_grad(): model(images); outputs captured with forward "
                                  "hooks", "outputs": list(expected)}}
    write_json(os.path.join(out, "config.json"), config)


@cli_main
def main(argv=None) -> int:
    return fixture_main(make, "vmamba", argv, upstream="a checkout of github.com/MzeroMiko/VMamba", seed=303,
                        cpu="native")


if __name__ == "__main__":
    sys.exit(main())
