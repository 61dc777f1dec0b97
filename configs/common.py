"""The study's recipe (SPEC section 6) with every field the trainer reads; each config starts here and overrides
what differs, so a field means the same thing everywhere."""

import ml_collections
from ml_collections import config_dict


def study_config():
    c = ml_collections.ConfigDict()
    c.dataset = ""
    c.data_root = ""
    c.fake_data = 0  # >0: write this many synthetic images at data_root if nothing is there
    c.data_options = ml_collections.ConfigDict()  # reader options, e.g. uncertain="ones" for CheXpert
    c.image_size = 224
    c.normalization = "dataset"  # the reference's per-dataset statistics; "imagenet" for the backbone's own
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.family = ""
    c.model.pretrained = ""  # a folder written by `python -m converters`
    c.model.convert_from = None  # or {checkpoint, model, config}: converted into WORKDIR/backbone on first use
    c.model.architecture = None  # or a backbone config dict: random init
    c.model.head = "linear"  # or "attention" (the DeiT-B Y-model; set attention_head.deit_params)
    c.model.freeze = "frozen"  # "frozen" | "full" | "partial" (with unfreeze_from_block)
    c.model.unfreeze_from_block = 0
    c.model.grayscale = "red"  # 1-channel data: keep the red filter of the RGB patch embedding, or "sum"
    c.model.remat = False  # ViT family: recompute each block's activations in the backward pass (less memory)
    c.model.scan = False  # ViT family: one nn.scan over the blocks (one compiled block; not with freeze="partial")
    c.model.attention_head = ml_collections.ConfigDict(
        {"deit_params": "", "width": 768, "depth": 12, "num_heads": 12, "grid": 14})

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4
    c.optim.weight_decay = 1e-5  # on parameters with ndim > 1 only
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
    c.optim.clip = 1.0
    c.optim.schedule = "reference"  # linear warm-up from 1e-8, then constant (with the reference's overshoot)
    c.optim.warmup_steps = config_dict.placeholder(int)  # when unset: warmup_epochs x steps per epoch
    c.optim.warmup_epochs = 0
    c.optim.layer_decay = config_dict.placeholder(float)

    c.batch_size = 64
    c.epochs = 100
    c.total_steps = 0  # 0: epochs x steps per epoch
    c.eval_every = 0  # 0: every epoch
    c.checkpoint_every = 0  # 0: at every evaluation
    c.log_every = 50
    c.compute_dtype = "bfloat16"  # float32 master weights, bf16 compute
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    c.sharding_rules = [(".*", "fsdp")]  # (regex over parameter paths, "fsdp" | "replicate"), first match wins
    c.worker_count = 0
    c.prefetch = 2  # batches transferred to the devices ahead of the running step
    c.progress_bar = True
    c.debug_sigkill_at_step = 0  # tests only: SIGKILL the run after this step (a preemption at a known point)
    return c
