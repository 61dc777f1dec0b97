"""Optimisation (SPEC section 6) with optax: AdamW with the reference decay mask, the reference warm-up, cosine decay,
global-norm clipping, per-parameter lr multipliers (layer-wise decay), and freezing (frozen parameters get neither
updates nor optimizer state). Which parameters train and their multipliers come from `medjax.rules`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def reference_schedule(lr: float, warmup_steps: int, start: float = 1e-8):
    """The study's LinearWarmup: the lr starts at `start` and grows by (lr - start) / W after every step, one step
    more than intended, so it settles at start + (W + 1) * (lr - start) / W ~= lr * (1 + 1/W) and never decays."""
    if warmup_steps <= 0:
        return optax.constant_schedule(lr)
    delta = (lr - start) / warmup_steps
    return lambda count: start + jnp.minimum(count, warmup_steps + 1) * delta


def make_schedule(cfg, total_steps: int, warmup_steps: int):
    if cfg.schedule == "reference":
        return reference_schedule(cfg.lr, warmup_steps)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(1e-8, cfg.lr, max(warmup_steps, 1),
                                                  max(total_steps, warmup_steps + 1),
                                                  end_value=cfg.end_lr)
    if cfg.schedule == "constant":
        return optax.constant_schedule(cfg.lr)
    raise ValueError(f"optim.schedule must be 'reference', 'cosine' or 'constant', got {cfg.schedule!r}")


def make_optimizer(cfg, trainable: dict, total_steps: int, warmup_steps: int, lr_scales: dict | None = None):
    """(optax transformation, schedule) from the config's `optim` section.

    adamw (the study): decay only on parameters with ndim > 1 (not biases, not norms), as the reference's param
    groups; adam (the glioma study): no weight decay; sgd: momentum b1. Clipping over the trained gradients' global
    norm. Frozen parameters (`trainable` False) get neither updates nor optimizer state; `lr_scales` (a tree of
    multipliers, from `medjax.rules.lr_scales`) scales each parameter's update (layer-wise lr decay)."""
    schedule = make_schedule(cfg, total_steps, warmup_steps)
    decay_mask = lambda tree: jax.tree_util.tree_map(lambda p: p.ndim > 1, tree)  # noqa: E731 (sees the trained subtree)
    chain = [optax.clip_by_global_norm(cfg.clip)] if cfg.clip else []
    if cfg.name == "adamw":
        chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 mask=decay_mask))
    elif cfg.name == "adam":
        chain.append(optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    elif cfg.name == "sgd":
        chain.append(optax.sgd(schedule, momentum=cfg.b1 or None))
    else:
        raise ValueError(f"optim.name must be adamw, adam or sgd, got {cfg.name!r}")
    labels = jax.tree_util.tree_map(lambda t: "train" if t else "freeze", trainable)
    tx = optax.multi_transform({"train": optax.chain(*chain), "freeze": optax.set_to_zero()}, labels)
    if lr_scales is not None:
        tx = optax.chain(tx, optax.GradientTransformation(
            lambda _: optax.EmptyState(),
            lambda updates, state, _=None: (jax.tree_util.tree_map(lambda u, s: u * s, updates, lr_scales), state)))
    return tx, schedule
