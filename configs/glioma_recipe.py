"""The glioma study's training protocol (Fu et al., arXiv 2402.07595; SPEC section 10) as overrides of the recipe.

Adam (no weight decay) at a constant lr 1e-4, no gradient clipping, cross-entropy, batch 32, 100 epochs, seed 1;
no augmentation: train and test images both go through resize 256 -> center crop 224 and ImageNet statistics; the
best model is the one with the best validation accuracy; test metrics are accuracy and weighted precision / recall /
F1 (in metrics.json with every other metric), each with a 95% percentile bootstrap interval over 5,000 resamples.

Heads: DINOv2 `_lc` backbones (converted with `--linear-head`, so the pooled feature is the 1000 ImageNet logits)
take the MLP head (Linear(1000, 256) -> ReLU -> Linear(256, C)); the torchvision CNNs a linear layer on their pooled
feature. Frozen: the whole backbone (the `_lc` linear classifier included) is frozen, the head trains.

Where medjax differs, on purpose or by construction:
- Splits: the readers' patient-disjoint seeded splits (the study split train 80/20 at random by image, so a
  patient's images could sit in train and val); the study's own test folder where the dataset has one.
- Grayscale sets (pneumonia X-rays) are read as 1 channel, the RGB stem summed over its input channels
  (`model.grayscale="sum"`), with ImageNet's red-channel statistics; the study replicated gray to RGB.
- The reported value is the metric of the whole test set; the bootstrap mean the study reported is stored too.
- Seeds: the bootstrap is seeded (the study's was not).
"""


def apply(c):
    """Sets the glioma study's protocol on a config built from `configs.common.study_config()`; returns it."""
    c.optim.name = "adam"  # torch.optim.Adam(lr=1e-4): no weight decay
    c.optim.lr = 1e-4
    c.optim.weight_decay = 0.0
    c.optim.schedule = "constant"
    c.optim.warmup_epochs = 0.0
    c.optim.clip = 0.0  # no gradient clipping
    c.batch_size = 32
    c.epochs = 100
    c.seed = 1
    c.train_augment = False  # no augmentation: Resize(256) -> CenterCrop(224) for train and test
    c.image_size = 224
    c.resize = "shorter"  # torchvision's Resize(256): the shorter side to 256, aspect kept, then CenterCrop(224)
    c.normalization = "imagenet"
    c.selection_metric = "accuracy"  # the best model by validation accuracy
    c.bootstrap.resamples = 5000
    c.compute_dtype = "float32"  # the study trained in float32
    c.model.grayscale = "sum"  # closest to replicating a gray image to RGB
    return c
