"""The study's recipe (SPEC section 6) with every field medjax reads, each declared once here with its default and
a one-line comment; each config starts here and overrides what differs, so a field means the same thing everywhere.

Configs are locked: `--config.x=y` for a field not declared here stops with one line naming the closest field, and a
value outside a field's allowed set (ALLOWED) stops with one line listing the allowed values (`validate`).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re

import ml_collections
from ml_collections import config_dict

from medjax.errors import UserError

# Fields with a closed set of values; `validate` checks them at start-up.
ALLOWED = {
    "normalization": ("dataset", "imagenet", "clip"),
    "resize": ("square", "shorter"),
    "compute_dtype": ("float32", "bfloat16"),
    "model.head": ("linear", "attention", "mlp"),
    "model.freeze": ("frozen", "full", "partial"),
    "model.peft": ("none", "lora", "bitfit"),
    "model.grayscale": ("red", "sum"),
    "optim.name": ("adamw", "adam", "sgd"),
    "optim.schedule": ("reference", "cosine", "constant"),
    "selection_metric": ("", "roc_auc", "mean_auc", "balanced_accuracy", "quadratic_kappa", "accuracy", "map"),
}

# Numeric fields and their allowed ranges, (low, high, bounds): bounds "[]" includes both ends, "()" neither, "[)",
# "(]"; None: no bound. `validate` checks them at start-up, before anything is written; a field missing here has no
# numeric range. Fields that may be unset (None) are checked only when set.
INF = None
RANGES = {
    "image_size": (1, INF, "[]"), "seed": (0, INF, "[]"), "fake_data": (0, INF, "[]"),
    "bootstrap.resamples": (0, INF, "[]"), "bootstrap.confidence": (0, 1, "()"), "bootstrap.seed": (0, INF, "[]"),
    "model.mlp_hidden": (1, INF, "[]"), "model.unfreeze_from_block": (0, INF, "[]"),
    "model.lora.rank": (1, INF, "[]"), "model.lora.alpha": (0, INF, "()"),
    "model.attention_head.width": (1, INF, "[]"), "model.attention_head.depth": (1, INF, "[]"),
    "model.attention_head.num_heads": (1, INF, "[]"), "model.attention_head.grid": (1, INF, "[]"),
    "optim.lr": (0, INF, "[]"), "optim.weight_decay": (0, INF, "[]"), "optim.b1": (0, 1, "[)"),
    "optim.b2": (0, 1, "[)"), "optim.eps": (0, INF, "()"), "optim.clip": (0, INF, "[]"),
    "optim.warmup_steps": (0, INF, "[]"), "optim.warmup_epochs": (0, INF, "[]"), "optim.end_lr": (0, INF, "[]"),
    "optim.layer_decay": (0, INF, "()"),
    "batch_size": (1, INF, "[]"), "epochs": (0, INF, "[]"), "total_steps": (0, INF, "[]"),
    "eval_every": (0, INF, "[]"), "checkpoint_every": (0, INF, "[]"), "log_every": (1, INF, "[]"),
    "mesh.data": (-1, INF, "[]"), "mesh.fsdp": (-1, INF, "[]"),  # -1 (the rest) or a positive size; 0 is refused
    "worker_count": (0, INF, "[]"), "prefetch": (0, INF, "[]"),
    "debug_sigkill_at_step": (0, INF, "[]"),
}
SHARDING_TACTICS = ("fsdp", "replicate")


def data_option_fields() -> dict:
    """{option: (default, datasets)}: the options every dataset declares beside its reader (`medjax.data.OPTIONS`,
    with a one-line help each; `python -m medjax.data describe --help` lists them), so a new reader's options appear
    here by themselves; `seed` is the config's own."""
    from medjax import data

    out: dict[str, tuple] = {}
    for name, declared in data.OPTIONS.items():
        for option, (default, _help) in declared.items():
            if option == "seed":
                continue
            first, datasets = out.get(option, (default, ()))
            out[option] = (first if first is not None else default, datasets + (name,))
    return out


def _data_options() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    for name, (default, _) in sorted(data_option_fields().items()):
        kind = type(default) if default is not None else str
        c[name] = config_dict.placeholder(kind)  # None: the reader's own default
    return c


def study_config():
    c = ml_collections.ConfigDict()
    c.dataset = ""  # chexpert | ddsm | cbis_ddsm | isic2019 | aptos2019 | csv | folder | ... (medjax.data.READERS)
    c.data_root = ""  # the dataset folder in its public layout
    c.fake_data = 0  # >0: write this many synthetic images at data_root if nothing is there
    # Reader options (None: the reader's default). Each applies to the datasets whose reader takes it; setting one
    # the dataset does not take stops at start-up, naming the datasets that do (README, Data).
    # Includes check_images (start-up image check), skip_bad_images and allow_outside_root, valid for every dataset.
    c.data_options = _data_options()
    c.image_size = 224  # train crop / eval size in pixels
    c.resize = "square"  # before the crop: square (the study: S x S, aspect not kept) | shorter (aspect kept)
    c.normalization = "dataset"  # the reference's per-dataset statistics; "imagenet" / "clip" for the backbone's own
    c.seed = 0  # split seed, init and data order
    c.train_augment = True  # False: train images get the eval transform only (resize, center crop; the glioma study)
    c.selection_metric = ""  # the validation metric that picks the best model; "": the dataset's target metric
    c.bootstrap = ml_collections.ConfigDict({
        "resamples": 1000,  # percentile bootstrap of each scalar test metric (glioma study: 5000); 0: none
        "confidence": 0.95,  # the intervals' coverage
        "seed": 0,  # the resamples' seed (patients are resampled where the test records have ids)
    })
    c.thresholds = "youden"  # multi-label operating points chosen on val: "youden" (max J) | "sensitivity:0.9"

    c.model = ml_collections.ConfigDict()
    c.model.family = ""  # the backbone family (medjax.models.FAMILIES); must match a converted folder's family
    c.model.pretrained = ""  # a folder written by `python -m converters`
    # or {checkpoint, model, config}: converted into WORKDIR/backbone on first use
    c.model.convert_from = ml_collections.ConfigDict({"checkpoint": "", "model": "", "config": ""})
    c.model.architecture = config_dict.placeholder(dict)  # or a backbone config dict: random init
    c.model.head = "linear"  # linear | attention (the DeiT-B Y-model; set attention_head.deit_params) | mlp
    c.model.mlp_hidden = 256  # model.head="mlp": pooled -> Dense(mlp_hidden) -> ReLU -> Dense(classes)
    c.model.freeze = "frozen"  # shorthand for trainable_rules: frozen | full | partial (with unfreeze_from_block)
    c.model.unfreeze_from_block = 0  # partial: backbone blocks from this one (0-based, network order) on train
    # Ordered (regex over the parameter path, "train" | "freeze") rules, first match wins; empty: from the shorthands
    # (model.freeze, model.peft) and the family's contract. Paths look like backbone/blocks_3/attn/qkv/kernel.
    c.model.trainable_rules = ()
    c.model.peft = "none"  # none | lora (adapters on the family's LoRA targets) | bitfit (biases + head)
    c.model.lora = ml_collections.ConfigDict({
        "rank": 48,  # the radiology study's rank
        "alpha": 16.0,  # scale alpha / rank
        "targets": (),  # regexes over backbone paths of the 2-d kernels to adapt; empty: the family's LoRA targets
    })
    c.model.grayscale = "red"  # 1-channel data: keep the red filter of the RGB stem, or "sum"
    c.model.remat = False  # ViT family: recompute each block's activations in the backward pass (less memory)
    c.model.scan = False  # ViT family: one nn.scan over the blocks (one compiled block; no per-block rules)
    c.model.attention_head = ml_collections.ConfigDict({
        "deit_params": "",  # a converted deit_base_patch16_224 folder (the reference's body); "": random init
        "width": 768, "depth": 12, "num_heads": 12, "grid": 14})  # the random-init body's shape

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"  # adamw (the study) | adam (the glioma study: no weight decay) | sgd (momentum b1)
    c.optim.lr = 1e-4  # peak learning rate
    c.optim.weight_decay = 1e-5  # on parameters with ndim > 1 only
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8  # Adam moments (b1: SGD momentum)
    c.optim.clip = 1.0  # global-norm gradient clipping over the trained parameters; 0: none
    c.optim.schedule = "reference"  # linear warm-up from 1e-8, then constant (with the reference's overshoot)
    c.optim.warmup_steps = config_dict.placeholder(int)  # when unset: warmup_epochs x steps per epoch
    c.optim.warmup_epochs = 0.0  # warm-up length in epochs when warmup_steps is unset
    c.optim.end_lr = 0.0  # cosine: the final learning rate
    c.optim.layer_decay = config_dict.placeholder(float)  # shorthand for lr_scale_rules: decay ** (L + 1 - depth)
    # Ordered (regex over the parameter path, lr multiplier) rules, first match wins; empty: from layer_decay.
    c.optim.lr_scale_rules = ()

    c.batch_size = 64  # global batch over every device and host
    c.epochs = 100  # training length when total_steps is 0
    c.total_steps = 0  # 0: epochs x steps per epoch
    c.eval_every = 0  # steps between validations; 0: every epoch
    c.checkpoint_every = 0  # steps between checkpoints; 0: at every evaluation
    c.keep_checkpoints = 2  # checkpoints kept in WORKDIR/checkpoints (the best model is kept apart)
    c.log_every = 50  # steps between loss / lr / throughput updates
    c.compute_dtype = "bfloat16"  # float32 master weights; bfloat16 or float32 compute
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})  # device mesh; -1 takes the rest
    c.sharding_rules = ((".*", "fsdp"),)  # (regex over parameter paths, "fsdp" | "replicate"), first match wins
    c.worker_count = 0  # grain worker processes per host
    c.prefetch = 2  # batches transferred to the devices ahead of the running step
    c.progress_bar = True  # tqdm progress bar on process 0
    c.debug_sigkill_at_step = 0  # tests only: SIGKILL the run after this step (a preemption at a known point)
    c.debug_sigkill_at = ""  # tests only: SIGKILL at a named point of the save path (see medjax.train)
    return c


class ConfigError(UserError):
    """A config field is unknown or holds a value outside its allowed set."""


def unknown_field_message(config, dotted: str) -> str:
    """'unknown config field x.y; did you mean x.z?' with the closest declared field."""
    known = sorted(_dotted_fields(config))
    close = difflib.get_close_matches(dotted, known, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]}?" if close else "; see configs/common.py for the fields"
    return f"unknown config field {dotted!r}{hint}"


def _dotted_fields(config, prefix="") -> list[str]:
    out = []
    for k in config.keys():
        v = config[k]
        path = f"{prefix}{k}"
        out.append(path)
        if isinstance(v, ml_collections.ConfigDict):
            out += _dotted_fields(v, path + ".")
    return out


def _value(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def _range_text(low, high, bounds: str) -> str:
    if high is None:
        return f"a number {'>=' if bounds[0] == '[' else '>'} {low}"
    return f"a number in {bounds[0]}{low}, {high}{bounds[1]}"


def check_range(dotted: str, value, low, high, bounds: str = "[]") -> None:
    """ConfigError unless `value` is a number within (low, high, bounds) (RANGES' notation)."""
    expected = _range_text(low, high, bounds)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"config field {dotted}={value!r}: expected {expected}")
    ok = ((low is None or (value >= low if bounds[0] == "[" else value > low))
          and (high is None or (value <= high if bounds[1] == "]" else value < high)))
    if not ok or (dotted.startswith("mesh.") and value == 0):
        raise ConfigError(f"config field {dotted}={value!r}: expected "
                          + ("-1 (the devices the other axis leaves) or a positive size" if dotted.startswith("mesh.")
                             else expected))


def validate(config) -> None:
    """Values outside a field's allowed set or range, bad sharding rules, an image size the model cannot take, and
    data options the chosen dataset does not take raise ConfigError (one line naming the field and what is
    expected)."""
    for dotted, allowed in ALLOWED.items():
        node = _value(config, dotted)
        if node not in allowed:
            raise ConfigError(f"config field {dotted}={node!r} is not allowed; allowed values: {', '.join(allowed)}")
    for dotted, (low, high, bounds) in RANGES.items():
        value = _value(config, dotted)
        if value is not None:
            check_range(dotted, value, low, high, bounds)
    if config.mesh.data == -1 and config.mesh.fsdp == -1:
        raise ConfigError("config fields mesh.data and mesh.fsdp are both -1; at most one axis takes the rest")
    for i, rule in enumerate(config.sharding_rules):
        if not isinstance(rule, (tuple, list)) or len(rule) != 2 or rule[1] not in SHARDING_TACTICS:
            raise ConfigError(f"config field sharding_rules[{i}]={rule!r}: expected a (regex, tactic) pair with tactic "
                              f"one of {', '.join(SHARDING_TACTICS)}")
        try:
            re.compile(rule[0])
        except (re.error, TypeError) as e:
            raise ConfigError(f"config field sharding_rules[{i}]: regex {rule[0]!r} does not compile ({e})") from None
    _check_image_size(config)
    fields = data_option_fields()
    for name in config.data_options.keys():
        value = config.data_options[name]
        if value is not None and config.dataset not in fields[name][1]:
            raise ConfigError(f"config field data_options.{name} does not apply to dataset {config.dataset!r}; it "
                              f"is an option of {', '.join(fields[name][1])}")


def _check_image_size(config) -> None:
    """image_size must be at least the backbone's patch (or stem stride): from model.architecture, or the converted
    folder's medjax.json when it is readable (a missing folder is reported later, where it is loaded)."""
    arch = config.model.architecture
    for path, key in ((os.path.join(config.model.pretrained, "medjax.json") if config.model.pretrained else "",
                       "architecture"), (config.model.convert_from.config, None)):
        if arch is None and path:
            try:
                with open(path) as f:
                    arch = json.load(f)
                arch = arch.get(key) if key else arch
            except (OSError, ValueError, AttributeError):
                arch = None
    if not isinstance(arch, dict):
        return
    patch = arch.get("patch_size") or arch.get("patch_stride")
    patch = max(patch) if isinstance(patch, (list, tuple)) and patch else patch
    if isinstance(patch, int) and not isinstance(patch, bool) and patch > 0 and config.image_size < patch:
        raise ConfigError(f"config field image_size={config.image_size}: the model's patches are {patch} px; expected "
                          f"at least {patch}, a multiple of {patch} (e.g. {patch * max(1, 224 // patch)})")


def data_options(config) -> dict:
    """The reader options the config sets (None fields left to the reader)."""
    return {k: config.data_options[k] for k in config.data_options.keys() if config.data_options[k] is not None}


def make(overrides: dict | None = None) -> ml_collections.ConfigDict:
    """`study_config()` with dotted overrides ({'model.family': 'dinov2', 'optim.lr': 1e-2}), locked: how library
    code, benchmarks and tests build a config, so that every field keeps its declared default."""
    c = study_config()
    for dotted, value in (overrides or {}).items():
        *parents, leaf = dotted.split(".")
        node = c
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise ConfigError(unknown_field_message(c, dotted))
        node[leaf] = value
    c.lock()
    return c
