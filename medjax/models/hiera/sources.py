"""Official SAM 2.1 checkpoints (the image encoder is kept), by upstream file name. URLs: facebookresearch/sam2
`checkpoints/download_ckpts.sh` (`SAM2p1_BASE_URL`); no digest is published. Sizes approximate (MiB)."""

from medjax.weights.registry import url_source

_BASE = "https://dl.fbaipublicfiles.com/segment_anything_2/092824"

SOURCES = [
    url_source(f"sam2.1_hiera_{size}", f"sam2.1_hiera_{short.lower()}", f"{_BASE}/sam2.1_hiera_{size}.pt", mb,
               "Apache-2.0", f"SAM 2.1 Hiera {short} (sam2 download_ckpts.sh)")
    for size, short, mb in (("base_plus", "B+", 309), ("large", "L", 857))
]
