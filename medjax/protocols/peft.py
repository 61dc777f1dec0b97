"""Parameter-efficient fine-tuning (SPEC section 8): LoRA and BitFit, without touching the model code.

LoRA (rank 48, alpha 16, on the qkv and MLP kernels): the base parameters stay frozen; every selected Dense kernel
W (in, out) gets adapters A (in, r) and B (r, out), and the forward uses W + (alpha / r) A @ B, merged into the
parameter tree inside the loss before `model.apply`. A is drawn as PEFT draws it (kaiming-uniform with a = sqrt(5),
i.e. U(-1/sqrt(in), 1/sqrt(in))), B is zero, so the adapted model starts as the base model exactly. The adapters live
in the same parameter tree under `lora/` (mirroring the kernel's path), so the engine's pieces work unchanged:

    model, params = classifier.build_classifier(cfg, num_classes, channels, image_size, rng)
    model, params = add_lora(model, params, rng)             # a wrapper whose apply() merges the adapters
    trainable = lora_mask(params)                            # backbone frozen; head and lora/ trained
    tx, _ = optim.make_optimizer(optim_cfg, params, trainable, total_steps, warmup_steps)
    step = jax.jit(train.make_train_step(model, tx, task, trainable))

BitFit: `bitfit_mask(params)` trains every bias of the backbone (Dense, Conv and norm biases) plus the head; pass it as
`trainable` to the same optimizer and train step.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from medjax.pretrained import flatten, unflatten

RANK, ALPHA = 48, 16.0
# qkv and the MLP (fc1/fc2, or SwiGLU's w12/w3) kernels of the backbone's blocks
LORA_TARGETS = r"^backbone/(.*/)?blocks_\d+/(attn/qkv|mlp/(fc1|fc2|w12|w3))/kernel$"


def lora_targets(params: dict, pattern: str = LORA_TARGETS) -> list[str]:
    flat = flatten(params)
    found = [p for p, v in flat.items() if re.search(pattern, p) and np.ndim(v) == 2]
    if not found:
        raise ValueError(f"no 2-d kernel matches the LoRA target pattern {pattern!r}")
    return found


def init_lora(params: dict, rng, rank: int = RANK, pattern: str = LORA_TARGETS) -> dict:
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


def add_lora(model, params: dict, rng, rank: int = RANK, alpha: float = ALPHA, pattern: str = LORA_TARGETS):
    """(LoraModel, params with a `lora` subtree). Train with optim.trainable_mask(params, 'frozen')."""
    if "lora" in params:
        raise ValueError("the parameters already hold LoRA adapters")
    return LoraModel(model, alpha, rank), {**params, "lora": init_lora(params, rng, rank, pattern)}


def lora_mask(params: dict) -> dict:
    """True for the adapters and the head, False for every base backbone parameter (the engine's 'frozen' mask)."""
    from medjax import optim

    return optim.trainable_mask(params, "frozen")


def bitfit_mask(params: dict, include_norms: bool = True) -> dict:
    """True for the head and the backbone's biases (all of them, or only Dense/Conv biases with include_norms=False)."""
    flat = flatten(params)

    def trained(path: str) -> bool:
        if not path.startswith("backbone/"):
            return True
        if not path.endswith("/bias"):
            return False
        return include_norms or not re.search(r"(norm[^/]*|ln_[^/]*)/bias$", path)
    return unflatten({k: trained(k) for k in flat})


def count_trainable(params: dict, mask: dict) -> int:
    flat, m = flatten(params), flatten(mask)
    return int(sum(np.size(v) for k, v in flat.items() if m[k]))


# ------------------------------------------------------------------------------------------------ fine-tuning run


def finetune(params_dir: str, dataset, *, method: str, image_size: int = 224, epochs: int = 10,
             batch_size: int = 64, lr: float = 1e-4, weight_decay: float = 1e-5, warmup_epochs: float = 1.0,
             rank: int = RANK, alpha: float = ALPHA, seed: int = 0, normalization="dataset", grayscale: str = "red",
             log=print) -> dict:
    """LoRA or BitFit fine-tuning of a converted backbone with a linear head: AdamW (the study's betas, decay on
    ndim > 1, clipping 1.0), warm-up then cosine, train transforms; validation every epoch keeps the best parameters
    (in memory), tested once at the end. A compact loop for these two protocols; the main trainer (medjax.main) adds
    checkpointing, resumption and sharding for long runs."""
    import ml_collections

    from medjax import classifier, metrics, optim, train
    from medjax.data import make_loader, num_batches

    cfg = ml_collections.ConfigDict({"family": "", "pretrained": params_dir, "architecture": None, "head": "linear",
                                     "grayscale": grayscale})
    model, params = classifier.build_classifier(cfg, dataset.num_classes, dataset.channels, image_size,
                                                jax.random.PRNGKey(seed))
    if method == "lora":
        model, params = add_lora(model, params, jax.random.PRNGKey(seed + 1), rank, alpha)
        trainable = lora_mask(params)
    elif method == "bitfit":
        trainable = bitfit_mask(params)
    else:
        raise ValueError(f"method must be 'lora' or 'bitfit', got {method!r}")
    steps_per_epoch = num_batches(dataset, "train", batch_size, train=True, shard_count=1)
    if steps_per_epoch == 0:
        raise ValueError(f"the train split has fewer than {batch_size} images")
    total = epochs * steps_per_epoch
    ocfg = ml_collections.ConfigDict({"lr": lr, "weight_decay": weight_decay, "b1": 0.9, "b2": 0.999, "eps": 1e-8,
                                      "clip": 1.0, "schedule": "cosine", "end_lr": 0.0})
    tx, _ = optim.make_optimizer(ocfg, params, trainable, total, int(warmup_epochs * steps_per_epoch))
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                             rng=jax.random.PRNGKey(seed))
    step_fn = jax.jit(train.make_train_step(model, tx, dataset.task, trainable))
    eval_fn = jax.jit(train.make_eval_step(model, dataset.task))

    def evaluate(p, split):
        probs, labels = [], []
        for batch in make_loader(dataset, split, batch_size=batch_size, image_size=image_size, train=False,
                                 normalization=normalization, shard_index=0, shard_count=1):
            mask = np.asarray(batch["mask"])
            probs.append(np.asarray(eval_fn(p, batch["image"]), np.float64)[mask])
            labels.append(np.asarray(batch["label"])[mask])
        return metrics.compute_metrics(dataset.task, np.concatenate(probs), np.concatenate(labels),
                                       dataset.class_names)

    loader = make_loader(dataset, "train", batch_size=batch_size, image_size=image_size, train=True, seed=seed,
                         normalization=normalization, shard_index=0, shard_count=1, num_epochs=epochs)
    best, history = {"epoch": None, "value": None, "params": None, "val": None}, []
    for epoch in range(1, epochs + 1):
        for _ in range(steps_per_epoch):
            batch = next(loader)
            state, out = step_fn(state, {"image": batch["image"], "label": batch["label"]})
        if not bool(out["finite"]):
            raise FloatingPointError(f"non-finite loss in epoch {epoch}; lower the lr")
        val = evaluate(state.params, "val")
        value = metrics.target_metric(dataset.target_metric, val)
        history.append({"epoch": epoch, "loss": float(out["loss"]), dataset.target_metric: value})
        if log:
            log(f"{method} epoch {epoch}: loss {float(out['loss']):.4f} val {dataset.target_metric} {value}")
        if value is not None and (best["value"] is None or value > best["value"]):
            best = {"epoch": epoch, "value": value, "params": jax.device_get(state.params), "val": val}
    result = {"method": method, "trainable_params": count_trainable(params, trainable),
              "total_params": count_trainable(params, jax.tree_util.tree_map(lambda _: True, trainable)),
              "epochs": epochs, "lr": lr, "best_epoch": best["epoch"], "history": history, "val": best["val"],
              "target_metric": dataset.target_metric}
    if method == "lora":
        result |= {"rank": rank, "alpha": alpha}
    if best["params"] is not None and "test" in dataset.splits:
        test = evaluate(best["params"], "test")
        result |= {"test": test, "test_target": metrics.target_metric(dataset.target_metric, test)}
    return result
