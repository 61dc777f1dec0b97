"""The official Segment Anything (v1) checkpoints (image encoder kept), from facebookresearch/segment-anything's
README. The file names' hex tails are not documented as digests, so none is checked. Sizes approximate (MiB)."""

from medjax.weights.registry import url_source

_BASE = "https://dl.fbaipublicfiles.com/segment_anything"

SOURCES = [
    url_source(f"sam_vit_{size}", f"sam_vit_{size}", f"{_BASE}/sam_vit_{size}_{tail}.pth", mb, "Apache-2.0",
               f"segment-anything vit_{size}")
    for size, tail, mb in (("b", "01ec64", 358), ("l", "0b3195", 1191), ("h", "4b8939", 2445))
]
