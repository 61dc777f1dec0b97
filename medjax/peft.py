"""Parameter-efficient fine-tuning (SPEC section 8): LoRA and BitFit, without touching the model code. Both train
through the main trainer (`model.peft="lora"` / `"bitfit"` in the config; `python -m medjax.protocols peft` runs it),
so they get its checkpoints, exact resume, progress bar and metrics.json.

LoRA (rank 48, alpha 16, on the family's LoRA targets: the qkv and MLP kernels for the transformers): the base
parameters stay frozen; every selected Dense kernel W (in, out) gets adapters A (in, r) and B (r, out), and the
forward uses W + (alpha / r) A @ B, merged into the parameter tree inside the loss before `model.apply`. A is drawn
as PEFT draws it (kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))), B is zero, so the adapted model
starts as the base model exactly. The adapters live in the same parameter tree under `lora/` (mirroring the kernel's
path); the trainable rules `[("^lora/", train), ("^backbone/", freeze), (".*", train)]` train them and the head.

BitFit: the rules `[("^backbone/.*/bias$", train), ("^backbone/", freeze), (".*", train)]` train every bias of the
backbone (Dense, Conv and norm biases) plus the head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from medjax import schema
from medjax.rules import compile_rules, first_match
from medjax.tree import flatten, unflatten

RANK, ALPHA = schema.study_config().model.lora.rank, schema.study_config().model.lora.alpha  # the declared defaults


def backbone_patterns(patterns) -> str:
    """One regex over classifier paths from the family's backbone-relative LoRA target regexes."""
    return "^backbone/(?:" + "|".join(f"(?:{p})" for p in patterns) + ")"


def lora_targets(params: dict, pattern: str) -> list[str]:
    flat = flatten(params)
    compiled = compile_rules([(pattern, True)], "model.lora.targets")
    found = [p for p, v in flat.items() if first_match(compiled, p) and np.ndim(v) == 2]
    if not found:
        raise ValueError(f"no 2-d kernel matches the LoRA target pattern {pattern!r}")
    return found


def init_lora(params: dict, rng, pattern: str, rank: int = RANK) -> dict:
    """{kernel path...: {'lora_a': (in, r), 'lora_b': (r, out) zeros}} as a nested tree (no '/' in keys)."""
    flat = flatten(params)
    out = {}
    for i, path in enumerate(lora_targets(params, pattern)):
        fan_in, fan_out = np.shape(flat[path])
        bound = 1.0 / np.sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(rng, i), (fan_in, rank), jnp.float32, -bound, bound)
        out[f"{path}/lora_a"] = np.asarray(a)
        out[f"{path}/lora_b"] = np.zeros((rank, fan_out), np.float32)
    return unflatten(out)


def merge_lora(params: dict, lora: dict, alpha: float = ALPHA, rank: int | None = None) -> dict:
    """The parameter tree with W + (alpha / r) A @ B at every adapted kernel (jax-traceable)."""
    adapters = flatten(lora)
    flat = dict(flatten(params))
    for key in [k for k in adapters if k.endswith("/lora_a")]:
        path = key[:-len("/lora_a")]
        a, b = adapters[key], adapters[f"{path}/lora_b"]
        r = rank or a.shape[-1]
        w = flat[path]
        flat[path] = w + ((alpha / r) * jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST)).astype(w.dtype)
    return unflatten(flat)


class LoraModel:
    """Wraps a Flax model: apply({'params': {..., 'lora': adapters}}, x) runs the model with the merged weights."""

    def __init__(self, model, alpha: float = ALPHA, rank: int = RANK):
        self.model, self.alpha, self.rank = model, alpha, rank

    def apply(self, variables, *args, **kwargs):
        params = dict(variables["params"])
        lora = params.pop("lora")
        return self.model.apply({**variables, "params": merge_lora(params, lora, self.alpha, self.rank)},
                                *args, **kwargs)


def add_lora(model, params: dict, rng, pattern: str, rank: int = RANK, alpha: float = ALPHA):
    """(LoraModel, params with a `lora` subtree); `pattern` selects the kernels (see `backbone_patterns`)."""
    if "lora" in params:
        raise ValueError("the parameters already hold LoRA adapters")
    return LoraModel(model, alpha, rank), {**params, "lora": init_lora(params, rng, pattern, rank)}


def norm_biases(params: dict) -> set[str]:
    """Paths of the normalisation layers' biases: a `bias` beside a `scale` (LayerNorm, RMSNorm, BatchNorm), where a
    Dense or Conv bias sits beside a `kernel`. A structural rule: no layer names are matched."""
    flat = flatten(params)
    return {k for k in flat if k.endswith("/bias") and k[:-len("bias")] + "scale" in flat}


def count_trainable(params: dict, mask: dict) -> int:
    flat, m = flatten(params), flatten(mask)
    return int(sum(np.size(v) for k, v in flat.items() if m[k]))
