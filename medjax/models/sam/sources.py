"""The official Segment Anything (v1) checkpoints (image encoder kept), from facebookresearch/segment-anything's
README. The file names' hex tails are not documented as digests, so none is checked. Sizes approximate (MiB)."""

from medjax.weights.registry import Source, url

_BASE = "https://dl.fbaipublicfiles.com/segment_anything"

SOURCES = [
    Source("sam_vit_b", "sam_vit_b", (url(f"{_BASE}/sam_vit_b_01ec64.pth", 358),), "Apache-2.0",
           note="segment-anything vit_b"),
    Source("sam_vit_l", "sam_vit_l", (url(f"{_BASE}/sam_vit_l_0b3195.pth", 1191),), "Apache-2.0",
           note="segment-anything vit_l"),
    Source("sam_vit_h", "sam_vit_h", (url(f"{_BASE}/sam_vit_h_4b8939.pth", 2445),), "Apache-2.0",
           note="segment-anything vit_h"),
]
