"""What the families' fixture scripts (`medjax/models/<family>/make_fixture.py`) and the parity tests share: moving
an upstream torch model's weights away from their initial values, so that a LayerScale of 1.0, a zero bias or a fresh
norm cannot hide a porting bug. torch is imported by the caller (a test or a fixture script), never by medjax."""

from __future__ import annotations

import argparse
import collections
import importlib
import importlib.metadata
import json
import os
import platform
import sys

import numpy as np

from medjax.errors import UserError

# learned tokens and tables whose initial values are zeros or tiny: moved with a larger step
_TOKENS = ("cls_token", "position_embedding", "register_tokens", "mask_token")


def without_keys(checkpoint: str, out, *keys: str) -> str:
    """A copy of a torch checkpoint at `out` without `keys` (`model/name` for a key inside the file's `model` dict),
    for the tests of a converter's missing-key report; returns the copy's path."""
    import torch  # the caller's dependency (tests); medjax itself does not need torch

    state = torch.load(checkpoint, weights_only=True)
    for key in keys:
        *outer, name = key.split("/")
        inner = state
        for part in outer:
            inner = inner[part]
        del inner[name]
    torch.save(state, out)
    return str(out)


def torchvision_shim() -> None:
    """Declare torchvision's `nms` / `qnms` operators, so that PyPI's (CUDA) torchvision imports on a CPU-only torch;
    no torchvision operator runs in the fixture scripts. Call it before importing torchvision, and only for such a
    build (a CPU build registers the operators itself)."""
    import torch  # the caller's dependency (fixture scripts); medjax itself does not need torch

    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    torchvision_shim.lib = lib  # the declarations live as long as the library object


def save_fixture(out: str, config: dict, images, expected: dict, checkpoints: dict) -> None:
    """Write a fixture folder: each `{relative path: state dict}` with `torch.save` (as a plain OrderedDict),
    `config.json`, `images.npy` (float32 NCHW) and `expected.npz` (float32 arrays); folders are made."""
    import torch  # the caller's dependency, as above

    for name, state in checkpoints.items():
        os.makedirs(os.path.dirname(os.path.join(out, name)), exist_ok=True)
        torch.save(collections.OrderedDict(state), os.path.join(out, name))  # plain: no nn.Module `_metadata`
    write_json(os.path.join(out, "config.json"), config)
    np.save(os.path.join(out, "images.npy"), images.numpy())
    np.savez(os.path.join(out, "expected.npz"), **{k: v.detach().numpy() for k, v in expected.items()})


def hooked(model, images, modules: dict, inputs: dict | None = None) -> dict:
    """One `model(images)` with forward hooks: `modules` {name: module} give their outputs, `inputs` {name: module}
    their (first) inputs, cloned (DenseNet's forward applies an in-place ReLU to its features' output); returns
    {"logits": the model's output, **captured}."""
    captured = {}
    handles = [m.register_forward_hook(lambda _m, _i, o, k=k: captured.__setitem__(k, o.clone()))
               for k, m in modules.items()]
    handles += [m.register_forward_pre_hook(lambda _m, i, k=k: captured.__setitem__(k, i[0].clone()))
                for k, m in (inputs or {}).items()]
    logits = model(images)
    for h in handles:
        h.remove()
    return {"logits": logits, **captured}


def fixture_main(make, family: str, argv=None, upstream: str | None = None, seed: int | None = None,
                 cpu: str = "avx2") -> int:
    """The fixture scripts' command line: `python -m medjax.models.<family>.make_fixture OUT_DIR [--upstream DIR]
    [--seed N] [--torchvision-shim] [--cpu avx2|native]`, then `make(OUT_DIR[, DIR][, seed=N])`. `upstream`: the help
    of a required `--upstream` (a checkout of the upstream code); `seed`: the default of `--seed`."""
    p = argparse.ArgumentParser(prog=f"python -m medjax.models.{family}.make_fixture",
                                description=sys.modules[make.__module__].__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the folder to write (created)")
    if upstream:
        p.add_argument("--upstream", required=True, help=upstream)
    if seed is not None:
        p.add_argument("--seed", type=int, default=seed)
    p.add_argument("--torchvision-shim", action="store_true",
                   help="declare torchvision::nms/qnms first (PyPI's CUDA torchvision build on a CPU-only torch)")
    p.add_argument("--cpu", choices=["avx2", "native"], default=cpu,
                   help=f"avx2: torch's kernels and oneDNN's convolutions limited to AVX2 (ATEN_CPU_CAPABILITY, "
                        f"ONEDNN_MAX_CPU_ISA, set before the first op), as on the CPU that made the committed "
                        f"fixtures; AVX-512 kernels round differently (1e-7 to 1e-6); default {cpu}")
    a = p.parse_args(argv)
    if a.cpu == "avx2":
        os.environ.update(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    if a.torchvision_shim:
        torchvision_shim()
    make(a.out, *([a.upstream] if upstream else []), **({"seed": a.seed} if seed is not None else {}))
    print(f"wrote {a.out}")
    return 0


def perturb_(model, seed: int = 0):
    """Add seeded noise to every floating parameter and buffer of a torch model, in its own order, from one generator:
    std 0.5 / sqrt(fan_in) for weight matrices, 0.5 for learned tokens and position tables, 0.1 elsewhere."""
    import torch  # the caller's dependency (tests, fixture scripts); medjax itself does not need torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            std = 0.5 / np.sqrt(t[0].numel()) if (name.endswith("weight") and t.ndim >= 2) else 0.1
            if any(s in name for s in _TOKENS):
                std = 0.5
            t.add_(torch.randn(t.shape, generator=gen) * std)
    return model


# the shared fixtures' "embedding-like" tensors (tests/fixtures/*/README.md, "Perturbation"): std 0.5
_EMBEDDINGS = ("cls_token", "pos_embed", "register_tokens", "mask_token", "class_embedding", "positional_embedding",
               "position_embeddings", "position_embedding.weight", "word_embeddings.weight",
               "token_type_embeddings.weight")


def perturb_state_dict_(model, seed: int):
    """The recipe the shared upstream fixtures state in their README ("Perturbation"): after the upstream constructor's
    own init, every floating tensor of `model.state_dict()` (parameters and persistent buffers, in state_dict order)
    gets zero-mean Gaussian noise from one `torch.Generator().manual_seed(seed)`: std 0.5 for embedding-like tensors
    (`_EMBEDDINGS`, open_clip's attentional-pooler `query`), 0.5 / sqrt(shape[0]) for open_clip's right-multiplied
    `proj` matrix (x @ proj), 0.5 / sqrt(fan_in) for weight matrices and kernels (names ending in `weight`, ndim >= 2,
    fan_in = numel / shape[0]), 0.1 for every other tensor. BatchNorm statistics: running_mean += N(0, 0.1),
    running_var *= exp(N(0, 0.2)). Integer buffers are left as they are."""
    import torch  # the caller's dependency (tests, fixture scripts); medjax itself does not need torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=gen)
            if name.endswith("running_var"):
                t.mul_(torch.exp(noise * 0.2))
                continue
            if any(s in name for s in _EMBEDDINGS) or name.endswith("attn_pool.query"):
                std = 0.5
            elif name.rsplit(".", 1)[-1] == "proj" and t.ndim == 2:
                std = 0.5 / np.sqrt(t.shape[0])
            elif name.endswith("weight") and t.ndim >= 2:
                std = 0.5 / np.sqrt(t.numel() / t.shape[0])
            else:
                std = 0.1
            t.add_(noise * std)
    return model


def seeded_images(shape, seed: int):
    """The fixtures' input: float32 NCHW `torch.randn(shape)` from `torch.Generator().manual_seed(seed)`."""
    import torch  # the caller's dependency, as above

    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def import_upstream(checkout: str | None, module: str):
    """Import `module` from an upstream checkout (a directory put first on sys.path), or from the installed packages
    when `checkout` is None. Fixture scripts take the upstream code's location at run time, so they import it here."""
    if checkout is not None:
        if not os.path.isdir(checkout):
            raise UserError(f"upstream checkout {checkout!r}: not a directory")
        sys.path.insert(0, os.path.abspath(checkout))
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        where = f"the checkout {checkout!r}" if checkout is not None else "the installed packages"
        raise UserError(f"upstream module {module!r} does not import from {where}: {e}") from e


def versions(*packages: str) -> dict:
    """Python, numpy, torch and the named distributions' versions (those installed), for a fixture's provenance."""
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("torch", *packages):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def write_json(path: str, obj, sort_keys: bool = False) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=sort_keys)
        f.write("\n")
