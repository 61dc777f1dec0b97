"""Linear probe on cached frozen features (SPEC section 8, DINOv2's linear evaluation).

A head's input is the concatenated normed CLS of the last n blocks, optionally followed by the mean of the last
block's normed patch tokens (DINOv2's `create_linear_input`). The grid n in {1, 4} x avgpool in {False, True} x lr in
{1e-3, 5e-3, 1e-2, 5e-2} is trained at once as one stacked model: every head owns a weight (F, K) over the full
feature vector F = [CLS of the last n_max blocks, patch mean] and a fixed 0/1 mask of the rows its input uses.
Masked rows get exactly zero gradient, and with SGD without weight decay they stay at zero, so each head is exactly
a linear layer on its own input (checked by the tests against training one head alone).

Recipe: weights N(0, 0.01), bias 0; SGD momentum 0.9 (PyTorch's form: m = 0.9 m + g, w -= lr m), no weight decay;
lr cosine-annealed per step to 0 over the run; batch 128 (the last batch of an epoch is smaller, as a PyTorch loader
without drop_last); 10 epochs; cross-entropy (multi-class) or mean BCE (multi-label). Epoch e's order is
`numpy.random.default_rng((seed, e))`. Unlike DINOv2's script the lr is not rescaled by batch / 256.

Selection: every head is scored on validation by the dataset's target metric (compute_metrics / target_metric);
the best wins (undefined scores rank last, ties go to the first head in grid order); it is retrained from scratch on
train + val with the same recipe and evaluated on test once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax import metrics, schema
from medjax.errors import atomic_write

_PROBE = schema.study_config().probe  # the recipe's declared defaults
BLOCKS, AVGPOOL, LRS = tuple(_PROBE.blocks), tuple(_PROBE.avgpool), tuple(_PROBE.lrs)
HEAD_FILE = "probe_head.npz"  # the final head, written into the work directory


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    n_blocks: int
    avgpool: bool
    lr: float

    @property
    def name(self) -> str:
        return f"blocks{self.n_blocks}_avgpool{int(self.avgpool)}_lr{self.lr:g}"

    def to_dict(self) -> dict:
        return {"head": self.name, "n_last_blocks": self.n_blocks, "avgpool": self.avgpool, "lr": self.lr}


def head_grid(blocks=BLOCKS, avgpool=AVGPOOL, lrs=LRS, max_blocks: int | None = None, log=None):
    """(heads, skipped): the grid in order n, avgpool, lr; heads asking for more blocks than `max_blocks` are skipped
    (listed by name, and said through `log`) rather than silently clipped into duplicates."""
    heads = [HeadSpec(int(n), bool(a), float(lr)) for n in blocks for a in avgpool for lr in lrs]
    keep = [h for h in heads if max_blocks is None or h.n_blocks <= max_blocks]
    skipped = [h.name for h in heads if h not in keep]
    if not keep:
        raise ValueError(f"no head of the grid fits a backbone with {max_blocks} block(s): blocks={list(blocks)}")
    if skipped and log:
        log(f"skipped {len(skipped)} head(s) needing more than the backbone's {max_blocks} block(s)")
    return keep, skipped


# ------------------------------------------------------------------------------------------------ inputs


def full_input(feats) -> np.ndarray:
    """(N, (n_max + 1) * D): [CLS of block L - n_max + 1, ..., CLS of block L, patch mean]."""
    n, nb, d = feats.cls.shape
    return np.concatenate([feats.cls.reshape(n, nb * d), feats.patch_mean], axis=1).astype(np.float32)


def head_input(feats, n_blocks: int, avgpool: bool) -> np.ndarray:
    """A head's own input, built explicitly (DINOv2's create_linear_input), for reference and tests."""
    parts = [feats.cls[:, -n_blocks:].reshape(len(feats.cls), -1)]
    if avgpool:
        parts.append(feats.patch_mean)
    return np.concatenate(parts, axis=1).astype(np.float32)


def input_mask(head: HeadSpec, num_blocks: int, dim: int) -> np.ndarray:
    """0/1 over the rows of `full_input` that `head` reads."""
    if head.n_blocks > num_blocks:
        raise ValueError(f"head {head.name} needs {head.n_blocks} blocks, the features hold {num_blocks}")
    m = np.zeros(((num_blocks + 1) * dim,), np.float32)
    m[(num_blocks - head.n_blocks) * dim:num_blocks * dim] = 1
    if head.avgpool:
        m[num_blocks * dim:] = 1
    return m


# ------------------------------------------------------------------------------------------------ training


def _loss(logits, labels, weights, task):
    if task == "multiclass":
        per = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    else:
        per = optax.sigmoid_binary_cross_entropy(logits, labels).mean(axis=-1)
    return jnp.sum(per * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def batch_plan(num: int, epochs: int, batch_size: int, seed: int):
    """(indices (S, B), weights (S, B)): each epoch a seeded permutation cut into ceil(num / B) batches, the last one
    padded with weight-0 rows."""
    per_epoch = math.ceil(num / batch_size)
    idx = np.zeros((epochs * per_epoch, batch_size), np.int32)
    w = np.zeros((epochs * per_epoch, batch_size), np.float32)
    for e in range(epochs):
        perm = np.random.default_rng((seed, e)).permutation(num)
        for j in range(per_epoch):
            chunk = perm[j * batch_size:(j + 1) * batch_size]
            idx[e * per_epoch + j, :len(chunk)] = chunk
            w[e * per_epoch + j, :len(chunk)] = 1
    return idx, w


def init_heads(heads, masks: np.ndarray, num_classes: int, seed: int) -> dict:
    """w (H, F, K) ~ N(0, 0.01) on each head's rows (zero elsewhere), b (H, K) = 0. A head's draw depends only on
    (seed, n_blocks, avgpool), so it is the same whether it is trained in the grid or alone."""
    ws = []
    for h, m in zip(heads, masks):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), 2 * h.n_blocks + int(h.avgpool))
        ws.append(np.asarray(jax.random.normal(key, (len(m), num_classes))) * 0.01 * m[:, None])
    return {"w": np.stack(ws).astype(np.float32), "b": np.zeros((len(heads), num_classes), np.float32)}


def sgd_step(carry, batch, lrs, masks, *, task: str, total_steps: int, momentum: float = 0.9):
    """One SGD step of every head at once: carry (params, momentum buffers, t), batch (x (B, F), labels, weights (B,)),
    lr_h * 0.5 (1 + cos(pi t / T)). Returns the new carry."""
    def loss_fn(p, xb, yb, wb):
        logits = jnp.einsum("nf,hfk->hnk", xb, p["w"] * masks[:, :, None]) + p["b"][:, None]
        # the heads are independent: the gradient of the sum is each head's own gradient
        return jax.vmap(lambda lg: _loss(lg, yb, wb, task))(logits).sum()

    p, mom, t = carry
    g = jax.grad(loss_fn)(p, *batch)
    mom = jax.tree_util.tree_map(lambda mo, gr: momentum * mo + gr, mom, g)
    scale = lrs * optax.cosine_decay_schedule(1.0, total_steps)(t)  # 1 at t = 0, 0 at t = T
    p = {"w": p["w"] - scale[:, None, None] * mom["w"], "b": p["b"] - scale[:, None] * mom["b"]}
    return p, mom, t + 1


def make_sgd_step(heads, masks: np.ndarray, task: str, total_steps: int, momentum: float = 0.9):
    """`sgd_step` bound to a grid: step(carry, batch) -> carry (the benchmark's baseline uses it on features that the
    backbone recomputes every batch)."""
    return functools.partial(sgd_step, lrs=jnp.asarray([h.lr for h in heads], jnp.float32),
                             masks=jnp.asarray(masks), task=task, total_steps=total_steps, momentum=momentum)


def _train_scan(params, x, labels, idx, wts, lrs, masks, *, task, total_steps, momentum):
    def body(carry, plan):
        bi, bw = plan
        return sgd_step(carry, (x[bi], labels[bi], bw), lrs, masks, task=task, total_steps=total_steps,
                        momentum=momentum), None
    carry = (params, jax.tree_util.tree_map(jnp.zeros_like, params), jnp.zeros((), jnp.int32))
    return jax.lax.scan(body, carry, (idx, wts))[0][0]


@functools.cache
def _jitted(fn, static=()):
    return jax.jit(fn, static_argnames=static)


def train_heads(x: np.ndarray, labels: np.ndarray, task: str, num_classes: int, heads, num_blocks: int, dim: int, *,
                epochs: int = 10, batch_size: int = 128, momentum: float = 0.9, seed: int = 0) -> dict:
    """Trains all `heads` at once on full inputs x (N, F), one jitted scan over every step (compiled once per shape);
    returns {'w': (H, F, K), 'b': (H, K), 'masks': (H, F)}."""
    masks = np.stack([input_mask(h, num_blocks, dim) for h in heads])
    if x.shape[1] != masks.shape[1]:
        raise ValueError(f"inputs have {x.shape[1]} features, the heads expect {masks.shape[1]}")
    params = init_heads(heads, masks, num_classes, seed)
    idx, wts = batch_plan(len(x), epochs, batch_size, seed)
    run = _jitted(_train_scan, ("task", "total_steps", "momentum"))
    p = run(params, jnp.asarray(x, jnp.float32), jnp.asarray(labels), jnp.asarray(idx), jnp.asarray(wts),
            jnp.asarray([h.lr for h in heads], jnp.float32), jnp.asarray(masks), task=task, total_steps=len(idx),
            momentum=float(momentum))
    return {"w": np.asarray(p["w"]), "b": np.asarray(p["b"]), "masks": masks}


def _predict(w, b, masks, x, task):
    logits = jnp.einsum("nf,hfk->hnk", x, w * masks[:, :, None]) + b[:, None]
    return jax.nn.softmax(logits) if task == "multiclass" else jax.nn.sigmoid(logits)


def predict_heads(trained: dict, x: np.ndarray, task: str, chunk: int = 4096) -> np.ndarray:
    """Probabilities (H, N, K): softmax (multi-class) or sigmoid (multi-label) of every head."""
    f = _jitted(_predict, ("task",))
    w, b, m = (jnp.asarray(trained[k]) for k in ("w", "b", "masks"))
    return np.concatenate([np.asarray(f(w, b, m, jnp.asarray(x[i:i + chunk], jnp.float32), task=task), np.float64)
                           for i in range(0, len(x), chunk)], axis=1)


def select_head(values) -> int:
    """Index of the best value; None (undefined) ranks last, the first of equal values wins."""
    best = None
    for i, v in enumerate(values):
        if v is not None and not (isinstance(v, float) and math.isnan(v)) and (best is None or v > values[best]):
            best = i
    if best is None:
        raise ValueError("every head's validation metric is undefined (a single class in the validation split?)")
    return best


# ------------------------------------------------------------------------------------------------ protocol


def evaluate_heads(trained, x, labels, task, class_names, metric: str):
    probs = predict_heads(trained, x, task)
    ms = [metrics.compute_metrics(task, p, labels, class_names) for p in probs]
    return ms, [metrics.target_metric(metric, m) for m in ms]


def linear_probe(train, val, test, *, task: str, class_names, target_metric: str, heads=None, epochs: int = 10,
                 batch_size: int = 128, seed: int = 0, retrain: bool = True, test_metrics: bool = True) -> dict:
    """The full protocol on SplitFeatures: grid on train, selection on val, retrain on train + val, test once.
    `retrain=False` keeps the grid-trained head (used by few-shot, whose train set must stay small)."""
    nb, dim = train.num_blocks, train.dim
    if heads is None:
        heads, _ = head_grid(max_blocks=nb)
    k = len(class_names)
    kw = dict(epochs=epochs, batch_size=batch_size, seed=seed)
    grid = train_heads(full_input(train), train.labels, task, k, heads, nb, dim, **kw)
    val_metrics, values = evaluate_heads(grid, full_input(val), val.labels, task, class_names, target_metric)
    best = select_head(values)
    chosen = heads[best]
    result = {"target_metric": target_metric, "epochs": epochs, "batch_size": batch_size, "seed": seed,
              "num_train": len(train), "num_val": len(val),
              "grid": [h.to_dict() | {"val": v} for h, v in zip(heads, values)],
              "selected": chosen.to_dict() | {"val": values[best]}, "val": val_metrics[best]}
    if retrain:
        both = train.concat(val)
        final = train_heads(full_input(both), both.labels, task, k, [chosen], nb, dim, **kw)
        result["retrained_on"] = "train+val"
        result["num_retrain"] = len(both)
    else:
        final = {key: grid[key][best:best + 1] for key in ("w", "b", "masks")}
        result["retrained_on"] = None
    if test is not None and test_metrics:
        (test_m,), (test_v,) = evaluate_heads(final, full_input(test), test.labels, task, class_names, target_metric)
        result |= {"num_test": len(test), "test": test_m, "test_target": test_v}
    result["head_params"] = final
    return result


def run(feats: dict, workdir: str, *, task: str, class_names, target_metric: str, max_blocks: int, blocks=BLOCKS,
        avgpool=AVGPOOL, lrs=LRS, epochs: int = 10, batch_size: int = 128, seed: int = 0, retrain: bool = True,
        log=None) -> tuple[dict, np.ndarray]:
    """The linear-probe protocol on cached features (`feats`: SplitFeatures of train, val and test), the one flow of
    `python -m medjax.protocols probe` and the grid's probe cells: the head grid (heads needing more than the
    backbone's `max_blocks` blocks skipped, and said), selection on val, the chosen head retrained on train + val,
    tested once. The final head is written atomically to `workdir/probe_head.npz`. Returns (the result without the
    head's arrays, with `skipped_heads` and `head_file`; the final head's test probabilities)."""
    heads, skipped = head_grid(blocks, avgpool, lrs, max_blocks=max_blocks, log=log)
    result = linear_probe(feats["train"], feats["val"], feats["test"], task=task, class_names=class_names,
                          target_metric=target_metric, heads=heads, epochs=epochs, batch_size=batch_size, seed=seed,
                          retrain=retrain)
    final = result.pop("head_params")
    probs = predict_heads(final, full_input(feats["test"]), task)[0]
    with atomic_write(os.path.join(workdir, HEAD_FILE), "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in final.items()})
    return result | {"skipped_heads": skipped, "head_file": HEAD_FILE}, probs
