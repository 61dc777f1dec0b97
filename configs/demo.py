"""The embedded default: trains end to end with nothing downloaded, in about 30 s on 2 CPU cores.

Synthetic CheXpert-layout data (written on first use) and the bundled tiny DINOv2 (official torch.hub format, random
perturbed weights; converted on first use) with a linear head, fully fine-tuned at 56 px.
"""

import os

import ml_collections

import medjax

ASSET = os.path.join(os.path.dirname(medjax.__file__), "assets", "tiny_dinov2")


def get_config():
    c = ml_collections.ConfigDict()
    c.dataset = "chexpert"
    c.data_root = "/tmp/medjax_demo_data/CheXpert-v1.0-small"
    c.fake_data = 800  # write this many synthetic images at data_root if nothing is there
    c.data_options = ml_collections.ConfigDict()
    c.image_size = 56
    c.normalization = "dataset"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.family = "dinov2"
    c.model.pretrained = ""  # filled in by `convert_from` on first use
    c.model.convert_from = ml_collections.ConfigDict(
        {"checkpoint": os.path.join(ASSET, "checkpoint.pth"), "model": "dinov2",
         "config": os.path.join(ASSET, "config.json")})
    c.model.architecture = None
    c.model.head = "linear"
    c.model.freeze = "full"
    c.model.unfreeze_from_block = 0
    c.model.grayscale = "red"
    c.model.attention_head = ml_collections.ConfigDict(
        {"deit_params": "", "width": 48, "depth": 1, "num_heads": 3, "grid": 4})

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.weight_decay = 1e-5
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
    c.optim.clip = 1.0
    c.optim.schedule = "reference"
    c.optim.warmup_steps = 10
    c.optim.warmup_epochs = 0
    c.optim.layer_decay = None

    c.batch_size = 16
    c.epochs = 8
    c.total_steps = 0  # 0: epochs x steps per epoch
    c.eval_every = 0  # 0: every epoch
    c.checkpoint_every = 0  # 0: at every evaluation
    c.log_every = 5
    c.compute_dtype = "float32"
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    c.sharding_rules = [(".*", "fsdp")]
    c.worker_count = 0
    c.progress_bar = True
    c.debug_sigkill_at_step = 0  # tests only: SIGKILL the run after this step (a preemption at a known point)
    return c
