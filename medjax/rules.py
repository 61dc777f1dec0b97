"""Rules over parameter paths: which parameters train, and each one's learning-rate multiplier.

A rule list is ordered (regex, value) pairs; a parameter takes the value of the first rule whose regex matches its
`/`-joined path (`re.search`: anchor with `^` and `$` for a whole-path match), big_vision's pattern. Every rule list
of the config (`model.trainable_rules`, `optim.lr_scale_rules`, `sharding_rules`, `model.lora.targets`) is compiled
and matched here (`compile_rules`, `first_match`), so a regex means the same thing in each and a bad one is the same
one-line error. The config may give the lists
(`model.trainable_rules`, `optim.lr_scale_rules`); when it does not, they are expanded from the shorthands
(`model.freeze`, `model.unfreeze_from_block`, `model.peft`, `optim.layer_decay`) with the family's contract, which
alone knows the network order of its blocks and which parameters are embeddings.
"""

from __future__ import annotations

import re

from medjax.errors import UserError
from medjax.models.family import Family
from medjax.tree import flatten, unflatten

TRAIN, FREEZE = "train", "freeze"


class RuleError(UserError):
    """A rule list that does not fit the model (bad regex, a parameter no rule matches, an unknown value)."""


def _backbone(pattern: str) -> str:
    return f"^backbone/(?:{pattern})"


def trainable_rules(model_cfg, family: Family, backbone_config) -> list[tuple[str, str]]:
    """The config's `model.trainable_rules`, or the expansion of its shorthands."""
    if model_cfg.trainable_rules:
        return [(str(r), str(v)) for r, v in model_cfg.trainable_rules]
    if model_cfg.peft == "lora":
        return [("^lora/", TRAIN), ("^backbone/", FREEZE), (".*", TRAIN)]
    if model_cfg.peft == "bitfit":
        return [("^backbone/.*/bias$", TRAIN), ("^backbone/", FREEZE), (".*", TRAIN)]
    if model_cfg.freeze == "full":
        return [(".*", TRAIN)]
    if model_cfg.freeze == "frozen":
        return [("^backbone/", FREEZE), (".*", TRAIN)]
    if model_cfg.freeze != "partial":
        raise RuleError(f"model.freeze must be frozen, full or partial, got {model_cfg.freeze!r}")
    k = int(model_cfg.unfreeze_from_block)
    patterns = family.layer_patterns(backbone_config)  # [embeddings, block 0, ..., block L-1]
    depth = len(patterns) - 1
    if depth == 0:
        raise RuleError(f"model.freeze='partial' needs a backbone with blocks; the {family.name} contract lists none")
    if not 0 <= k <= depth + 1:
        raise RuleError(f"model.unfreeze_from_block={k}: the {family.name} backbone has blocks 0..{depth - 1} "
                        f"({depth} blocks; {depth} trains only what follows the blocks, {depth + 1} nothing)")
    if k > depth:
        return [("^backbone/", FREEZE), (".*", TRAIN)]
    frozen = [patterns[0]] + patterns[1:1 + k]  # the embeddings always stay frozen
    return [(_backbone("|".join(f"(?:{p})" for p in frozen)), FREEZE), (".*", TRAIN)]


def lr_scale_rules(optim_cfg, family: Family, backbone_config) -> list[tuple[str, float]]:
    """The config's `optim.lr_scale_rules`, or layer-wise decay: decay ** (L + 1 - depth), depth 0 for the
    embeddings, i for block i (1-based, network order), L + 1 (scale 1) for everything after the blocks and the head."""
    if optim_cfg.lr_scale_rules:
        return [(str(r), float(v)) for r, v in optim_cfg.lr_scale_rules]
    decay = optim_cfg.layer_decay
    if not decay:
        return []
    patterns = family.layer_patterns(backbone_config)
    top = len(patterns)
    return [(_backbone(p), float(decay ** (top - depth))) for depth, p in enumerate(patterns)] + [(".*", 1.0)]


def compile_rules(rules, what: str) -> list[tuple[re.Pattern, object]]:
    """(regex, value) pairs compiled; a bad regex is one RuleError naming the config field."""
    out = []
    for rule in rules:
        try:
            regex, value = rule
            out.append((re.compile(str(regex)), value))
        except re.error as e:
            raise RuleError(f"{what}: bad regex {regex!r}: {e}") from None
        except (TypeError, ValueError):
            raise RuleError(f"{what}: each rule is a (regex, value) pair, got {rule!r}") from None
    return out


def first_match(compiled, path: str):
    """(index, value) of the first compiled rule whose regex matches the path (`re.search`), or None."""
    return next(((i, v) for i, (rx, v) in enumerate(compiled) if rx.search(path)), None)


def resolve(rules, paths, what: str) -> dict[str, tuple[int, object]]:
    """{path: (index of the first matching rule, its value)}; every path must match a rule."""
    compiled = compile_rules(rules, what)
    out = {}
    for path in paths:
        hit = first_match(compiled, path)
        if hit is None:
            raise RuleError(f"{what}: no rule matches parameter {path!r}; end the list with ('.*', ...)")
        out[path] = hit
    return out


def trainable_mask(params: dict, rules) -> dict:
    """{path: bool} tree from (regex, 'train' | 'freeze') rules."""
    flat = flatten(params)
    hits = resolve(rules, flat, "model.trainable_rules")
    bad = sorted({str(v) for _, v in hits.values()} - {TRAIN, FREEZE})
    if bad:
        raise RuleError(f"model.trainable_rules: values must be '{TRAIN}' or '{FREEZE}', got {bad}")
    return unflatten({k: hits[k][1] == TRAIN for k in flat})


def lr_scales(params: dict, rules) -> dict | None:
    """{path: float} tree from (regex, multiplier) rules; None without rules."""
    if not rules:
        return None
    flat = flatten(params)
    hits = resolve(rules, flat, "optim.lr_scale_rules")
    return unflatten({k: float(hits[k][1]) for k in flat})
