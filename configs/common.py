"""The study's recipe (SPEC section 6) with every field medjax reads, each declared once here with its default and
a one-line comment; each config starts here and overrides what differs, so a field means the same thing everywhere.

Configs are locked: `--config.x=y` for a field not declared here stops with one line naming the closest field, and a
value outside a field's allowed set (ALLOWED) stops with one line listing the allowed values (`validate`).
"""

from __future__ import annotations

import difflib

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
    c.debug_signal_at_step = 0  # tests only: SIGTERM the run after this step (a preemption it saves and resumes from)
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


def validate(config) -> None:
    """Values outside a field's allowed set, and data options the chosen dataset does not take, raise ConfigError."""
    for dotted, allowed in ALLOWED.items():
        node = config
        for part in dotted.split("."):
            node = node[part]
        if node not in allowed:
            raise ConfigError(f"config field {dotted}={node!r} is not allowed; allowed values: {', '.join(allowed)}")
    fields = data_option_fields()
    for name in config.data_options.keys():
        value = config.data_options[name]
        if value is not None and config.dataset not in fields[name][1]:
            raise ConfigError(f"config field data_options.{name} does not apply to dataset {config.dataset!r}; it "
                              f"is an option of {', '.join(fields[name][1])}")


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
