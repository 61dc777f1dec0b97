"""DINOv2 ViT-B/14 with its ImageNet linear classifier (`dinov2_vitb14_lc`) and the MLP head on the pediatric pneumonia
X-rays, frozen, with the glioma study's protocol (medjax.studies.glioma_protocol; SPEC section 10).

Before running: convert the backbone with its linear head once,
    python -m converters dinov2_vitb14_pretrain.pth /data/medjax/dinov2_vitb14_lc --model dinov2_vitb14 \
        --linear-head dinov2_vitb14_linear_head.pth
and point data_root at the folder holding `chest_xray/`. `--config.model.freeze=full` fine-tunes everything. The
whole table (three CNNs and DINOv2 S/B/L on four datasets, frozen and full) is in the grid:
`python -m medjax.grid list --filter study=glioma`.
"""

from medjax.schema import study_config
from medjax.studies import glioma_protocol


def get_config():
    c = glioma_protocol(study_config())
    c.dataset = "chest_xray_pneumonia"
    c.data_root = "/data/chest_xray"
    c.model.family = "dinov2"
    c.model.pretrained = "/data/medjax/dinov2_vitb14_lc"
    c.model.head = "mlp"  # Linear(1000, 256) -> ReLU -> Linear(256, 2) on the 1000 ImageNet logits
    c.model.freeze = "frozen"
    return c
