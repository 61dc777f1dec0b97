"""Optimisation (SPEC section 6) with optax: AdamW with the reference decay mask, the reference warm-up, cosine decay,
global-norm clipping, layer-wise lr decay, and freezing (frozen parameters get neither updates nor optimizer state)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

from medjax.pretrained import flatten, unflatten


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
        return optax.warmup_cosine_decay_schedule(1e-8, cfg.lr, max(warmup_steps, 1), max(total_steps, warmup_steps + 1),
                                                  end_value=cfg.get("end_lr", 0.0))
    if cfg.schedule == "constant":
        return optax.constant_schedule(cfg.lr)
    raise ValueError(f"optim.schedule must be 'reference', 'cosine' or 'constant', got {cfg.schedule!r}")


def trainable_mask(params: dict, freeze: str, unfreeze_from_block: int = 0) -> dict:
    """True for trained parameters. freeze: 'frozen' (the backbone is fixed, the default), 'full', or 'partial'
    (backbone blocks from `unfreeze_from_block` on, and everything after the blocks, are trained)."""
    if freeze not in ("frozen", "full", "partial"):
        raise ValueError(f"model.freeze must be 'frozen', 'full' or 'partial', got {freeze!r}")
    flat = flatten(params)
    block_paths = [k for k in flat if k.startswith("backbone/") and re.search(r"/blocks_(\d+)/", k)]
    if freeze == "partial" and not block_paths:
        raise ValueError("model.freeze='partial' needs a backbone with numbered blocks (blocks_<i>)")
    last_block = max((int(re.search(r"/blocks_(\d+)/", k).group(1)) for k in block_paths), default=-1)

    def trained(path: str) -> bool:
        if not path.startswith("backbone/") or freeze == "full":
            return True
        if freeze == "frozen":
            return False
        m = re.search(r"/blocks_(\d+)/", path)
        if m:
            return int(m.group(1)) >= unfreeze_from_block
        # outside the blocks: the embeddings stay frozen, the final norm/projection after the blocks is trained
        return not re.match(r"backbone/(patch_embed|cls_token|pos_embed|reg_tokens|patch_norm|ln_pre)", path) \
            and unfreeze_from_block <= last_block + 1
    return unflatten({k: trained(k) for k in flat})


def layer_scales(params: dict, decay: float) -> dict:
    """Layer-wise lr decay: scale decay**(L + 1 - layer) with embeddings at layer 0, block i at i + 1, the rest L + 1."""
    flat = flatten(params)
    ids = {k: int(m.group(1)) + 1 for k in flat if (m := re.search(r"^backbone/.*?blocks_(\d+)/", k))}
    if not ids:
        raise ValueError("optim.layer_decay needs a backbone with numbered blocks (blocks_<i>); model.scan=True "
                         "stacks them into one `blocks` array, so it cannot be combined with layer decay")
    top = max(ids.values()) + 1
    embed = re.compile(r"backbone/(patch_embed|cls_token|pos_embed|reg_tokens|patch_norm|ln_pre)")

    def layer(k):
        return ids.get(k, 0 if embed.match(k) else top)
    return unflatten({k: decay ** (top - layer(k)) for k in flat})


def make_optimizer(cfg, params: dict, trainable: dict, total_steps: int, warmup_steps: int):
    """(optax transformation, schedule). Decay only on parameters with ndim > 1 (not biases, not norms), as the
    reference's param groups; clipping over the trained gradients' global norm."""
    schedule = make_schedule(cfg, total_steps, warmup_steps)
    decay_mask = lambda tree: jax.tree_util.tree_map(lambda p: p.ndim > 1, tree)  # noqa: E731 (sees the trained subtree)
    chain = [optax.clip_by_global_norm(cfg.clip)] if cfg.get("clip") else []
    chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=decay_mask))
    labels = jax.tree_util.tree_map(lambda t: "train" if t else "freeze", trainable)
    tx = optax.multi_transform({"train": optax.chain(*chain), "freeze": optax.set_to_zero()}, labels)
    if cfg.get("layer_decay"):
        scales = layer_scales(params, cfg.layer_decay)
        tx = optax.chain(tx, optax.GradientTransformation(
            lambda _: optax.EmptyState(),
            lambda updates, state, _=None: (jax.tree_util.tree_map(lambda u, s: u * s, updates, scales), state)))
    return tx, schedule
