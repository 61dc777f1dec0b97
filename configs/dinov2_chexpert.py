"""DINOv2 ViT-B/14 on CheXpert (v1.0-small) with the reference recipe of the study (SPEC section 6).

Before running: convert the official checkpoint once,
    python -m converters dinov2_vitb14_pretrain.pth /data/medjax/dinov2_vitb14 --model dinov2_vitb14
and point data_root at the CheXpert-v1.0-small folder (holding train.csv).
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.dataset = "chexpert"
    c.data_root = "/data/CheXpert-v1.0-small"
    c.fake_data = 0
    c.data_options = ml_collections.ConfigDict({"uncertain": "zeros", "frontal_only": False})
    c.image_size = 224
    c.normalization = "dataset"  # the reference's per-dataset statistics; "imagenet" for the backbone's own
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.family = "dinov2"
    c.model.pretrained = "/data/medjax/dinov2_vitb14"
    c.model.convert_from = None
    c.model.architecture = None
    c.model.head = "linear"  # or "attention" (the DeiT-B Y-model; set attention_head.deit_params)
    c.model.freeze = "frozen"  # "frozen" | "full" | "partial" (with unfreeze_from_block)
    c.model.unfreeze_from_block = 0
    c.model.grayscale = "red"  # the reference keeps the red filter of the RGB patch embedding; or "sum"
    c.model.attention_head = ml_collections.ConfigDict(
        {"deit_params": "", "width": 768, "depth": 12, "num_heads": 12, "grid": 14})

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4
    c.optim.weight_decay = 1e-5
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
    c.optim.clip = 1.0
    c.optim.schedule = "reference"  # linear warm-up from 1e-8, then constant (with the reference's overshoot)
    c.optim.warmup_steps = 1000  # ISIC / CheXpert: 1000 iterations; DDSM / APTOS: 5 epochs (warmup_epochs)
    c.optim.warmup_epochs = 0
    c.optim.layer_decay = None

    c.batch_size = 64
    c.epochs = 100
    c.total_steps = 0
    c.eval_every = 0  # every epoch
    c.checkpoint_every = 0
    c.log_every = 50
    c.compute_dtype = "bfloat16"  # float32 master weights, bf16 compute
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    c.sharding_rules = [(".*", "fsdp")]
    c.worker_count = 0
    c.progress_bar = True
    c.debug_sigkill_at_step = 0  # tests only: SIGKILL the run after this step (a preemption at a known point)
    return c
