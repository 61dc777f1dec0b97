"""What the families' fixture scripts (`medjax/models/<family>/make_fixture.py`) and the parity tests share: moving
an upstream torch model's weights away from their initial values, so that a LayerScale of 1.0, a zero bias or a fresh
norm cannot hide a porting bug. torch is imported by the caller (a test or a fixture script), never by medjax."""

from __future__ import annotations

import numpy as np

# learned tokens and tables whose initial values are zeros or tiny: moved with a larger step
_TOKENS = ("cls_token", "position_embedding", "register_tokens", "mask_token")


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


def without_keys(checkpoint: str, out, *keys: str) -> str:
    """A copy of a torch checkpoint at `out` without `keys` (`model/name` for a key inside the file's `model` dict),
    for the tests of a converter's missing-key report; returns the copy's path."""
    import torch  # the caller's dependency, as above

    state = torch.load(checkpoint, weights_only=True)
    for key in keys:
        *outer, name = key.split("/")
        inner = state
        for part in outer:
            inner = inner[part]
        del inner[name]
    torch.save(state, out)
    return str(out)
