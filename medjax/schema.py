"""The config schema: every field medjax reads, declared once here with its default and a one-line comment (the
study's recipe, SPEC section 6, is the default), the grid's and the protocols' fields included. Recipes (`configs/*.py`)
start from `study_config()` and override what differs, so a field means the same thing everywhere.

Configs are locked: `--config.x=y` for a field not declared here stops with one line naming the closest field, and a
value outside a field's allowed set (ALLOWED) stops with one line listing the allowed values (`validate`).

This module also holds the only code that flattens a config (`flatten`, as `run_config.json` stores it), rebuilds one
from its flat form (`from_flat`), applies dotted overrides (`make`, `override`) and finds and loads a recipe by name
or path (`recipe_path`, `load_recipe`).
"""

from __future__ import annotations

import difflib
import importlib.util
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
    # the dataset does not take stops at start-up, naming the datasets that do (docs/data.md).
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
    c.model.remat = False  # ViT, DINOv3, SAM ViT: recompute each block's activations in the backward pass
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
    c.debug_signal_at_step = 0  # tests only: SIGTERM the run after this step (a preemption it saves and resumes from)

    # The benchmark grid (medjax.studies; `--config=grid:CELL`): where its converted backbones and datasets live, and
    # the cell a run belongs to (recorded for the report).
    c.weights_dir = ""  # converted backbones, one folder per converter variant ($MEDJAX_WEIGHTS or /data/medjax)
    c.data_dir = ""  # datasets in their public layouts, one folder each ($MEDJAX_DATA or /data)
    c.grid_cell = ml_collections.ConfigDict({
        "model": "", "dataset": "", "head": "", "freeze": "", "study": "",  # the cell's axes (medjax.studies.AXES)
        "arg": "",  # model=...,dataset=...,head=...,freeze=...
        "backbone": "",  # the row name in the study's table
        "variant": "",  # the converted folder under weights_dir
        "params_m": 0.0,  # backbone parameters in millions as medjax counts them
        "in_study": True,  # False: a backbone the reference study did not report on this grid
        "kind": "",  # foundation | baseline
        "convert": "",  # the converter command that makes the cell's backbone folder
    })
    # The radiology study's linear probe (SPEC section 8; `python -m medjax.protocols probe`, the grid's probe cells):
    # the head grid (n last blocks x avgpool x lr) trained on frozen features, selected on val, retrained on train+val.
    c.probe = ml_collections.ConfigDict({
        "blocks": (1, 4),  # n last blocks whose normed CLS tokens are concatenated
        "avgpool": (False, True),  # also the mean of the last block's normed patch tokens
        "lrs": (1e-3, 5e-3, 1e-2, 5e-2),  # SGD momentum 0.9, cosine to 0
        "epochs": 10,
        "batch_size": 128,
        "seed": 0,
        "extract_batch_size": 64,  # the backbone pass over each split (features cached in the work directory)
    })
    # The radiology study's kNN protocol: weighted kNN (multi-class) or ML-kNN (multi-label) on the frozen features.
    c.knn = ml_collections.ConfigDict({"k": 20, "temperature": 0.07})
    return c


class ConfigError(UserError):
    """A config field is unknown or holds a value outside its allowed set."""


def unknown_field_message(config, dotted: str) -> str:
    """'unknown config field x.y; did you mean x.z?' with the closest declared field."""
    known = sorted(_dotted_fields(config))
    close = difflib.get_close_matches(dotted, known, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]}?" if close else "; see medjax/schema.py for the fields"
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


# -- flat form, overrides, recipes ------------------------------------------------------------------------------------

def flatten(d, prefix: str = "") -> dict:
    """A config (or its `to_dict()`) as {'model.lora.rank': 48, ...}: how `run_config.json` stores it."""
    if isinstance(d, ml_collections.ConfigDict):
        d = d.to_dict()
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.loads(json.dumps(v, default=str))
    return out


def from_flat(flat: dict) -> tuple[ml_collections.ConfigDict, list[str]]:
    """The config a flat dict (a run's `run_config.json`) describes, and the keys this medjax does not declare (left
    out). Dict-valued fields (`model.architecture`) are regrouped."""
    base = study_config()
    overrides, unknown = {}, []
    for key, value in flat.items():
        node, parts = base, key.split(".")
        for i, part in enumerate(parts):
            if not hasattr(node, "keys") or part not in node.keys():
                unknown.append(key)
                break
            if i + 1 < len(parts) and node.get_type(part) is dict:  # a dict field: its keys were flattened
                field = ".".join(parts[:i + 1])
                target = overrides.setdefault(field, {})
                for sub in parts[i + 1:-1]:
                    target = target.setdefault(sub, {})
                target[parts[-1]] = value
                break
            node = node[part] if i + 1 < len(parts) else node
        else:
            overrides[key] = value
    return make(overrides), unknown


def override(config, dotted: str, value) -> None:
    """Set one dotted field; an undeclared field raises ConfigError naming the closest declared one."""
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
        if not hasattr(node, "keys") or p not in node.keys():
            raise ConfigError(unknown_field_message(config, dotted))
        node = node[p]
    if not hasattr(node, "keys") or leaf not in node.keys():
        raise ConfigError(unknown_field_message(config, dotted))
    node[leaf] = value


def make(overrides: dict | None = None) -> ml_collections.ConfigDict:
    """`study_config()` with dotted overrides ({'model.family': 'dinov2', 'optim.lr': 1e-2}), locked: how library
    code, benchmarks and tests build a config, so that every field keeps its declared default."""
    c = study_config()
    for dotted, value in (overrides or {}).items():
        override(c, dotted, value)
    c.lock()
    return c


def recipes_dir() -> str:
    """The folder of the recipes that ship with medjax (the `configs` package beside `medjax`), located as data, not
    imported: recipes sit above the library."""
    spec = importlib.util.find_spec("configs")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the medjax recipes (the configs package) are not installed; reinstall medjax")
    return list(spec.submodule_search_locations)[0]


def recipe_names() -> list[str]:
    return sorted(f[:-3] for f in os.listdir(recipes_dir()) if f.endswith(".py") and not f.startswith("_"))


def recipe_path(spec: str) -> str:
    """A `--config` value (`demo`, `grid:model=...`, `configs/demo.py`, `/path/to/my_recipe.py[:arg]`) with its path
    resolved: an existing file as given; otherwise a recipe of medjax's by name (`demo`, or `configs/demo.py` from
    another directory). The `:arg` part is kept."""
    path, sep, arg = spec.partition(":")
    if os.path.isfile(path):
        return spec
    name = os.path.basename(path)[:-3] if path.endswith(".py") else path
    if os.sep in name or "/" in name or not name or (os.path.isabs(path) or path.startswith(".")):
        raise ConfigError(f"--config={spec}: {path}: file not found; expected a config file (a recipe file, or a "
                          f"recipe name: {', '.join(recipe_names())})")
    candidate = os.path.join(recipes_dir(), name + ".py")
    if not os.path.isfile(candidate) or name.startswith("_"):
        close = difflib.get_close_matches(name, recipe_names(), n=1)
        hint = f"; did you mean {close[0]}?" if close else f"; recipes: {', '.join(recipe_names())}"
        raise ConfigError(f"--config={spec}: no such recipe file or recipe name{hint}")
    return candidate + sep + arg


def load_recipe(spec: str) -> ml_collections.ConfigDict:
    """The config a recipe builds (`get_config()` or `get_config(arg)`), found by `recipe_path`."""
    path, _, arg = recipe_path(spec).partition(":")
    module_spec = importlib.util.spec_from_file_location(f"medjax_recipe_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
