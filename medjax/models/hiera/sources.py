"""Official SAM 2.1 checkpoints (the image encoder is kept), by upstream file name. URLs: facebookresearch/sam2
`checkpoints/download_ckpts.sh` (`SAM2p1_BASE_URL`); no digest is published. Sizes approximate (MiB)."""

from medjax.weights.registry import Source, url

_BASE = "https://dl.fbaipublicfiles.com/segment_anything_2/092824"

SOURCES = [
    Source("sam2.1_hiera_base_plus", "sam2.1_hiera_b+", (url(f"{_BASE}/sam2.1_hiera_base_plus.pt", 309),),
           "Apache-2.0", note="SAM 2.1 Hiera B+ (sam2 download_ckpts.sh)"),
    Source("sam2.1_hiera_large", "sam2.1_hiera_l", (url(f"{_BASE}/sam2.1_hiera_large.pt", 857),),
           "Apache-2.0", note="SAM 2.1 Hiera L (sam2 download_ckpts.sh)"),
]
