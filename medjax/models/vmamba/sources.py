"""The released VMamba v2 classification checkpoints of the study (`vmambav2_{small,base}_224`), from the release
links of MzeroMiko/VMamba's README; no digest is published. Sizes approximate (MiB): the parameters in float32; the
release files are training checkpoints (`model`, and a yacs CfgNode of the run, read as plain data) and may be larger.
"""

from medjax.weights.registry import Source, url

_BASE = "https://github.com/MzeroMiko/VMamba/releases/download/%23v2cls"

SOURCES = [
    Source("vssm_small_0229", "vmamba_small", (url(f"{_BASE}/vssm_small_0229_ckpt_epoch_222.pth", 192),), "MIT",
           note="VMamba-S [s2l15], vmambav2_small_224 (README classification table)"),
    Source("vssm_base_0229", "vmamba_base", (url(f"{_BASE}/vssm_base_0229_ckpt_epoch_237.pth", 338),), "MIT",
           note="VMamba-B [s2l15], vmambav2_base_224 (README classification table)"),
]
