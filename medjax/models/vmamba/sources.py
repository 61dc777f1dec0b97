"""The released VMamba v2 classification checkpoints of the study (`vmambav2_{small,base}_224`), from the release
links of MzeroMiko/VMamba's README; no digest is published. Sizes approximate (MiB): the parameters in float32; the
release files are training checkpoints (`model`, and a yacs CfgNode of the run, read as plain data) and may be larger.
"""

from medjax.weights.registry import url_source

_BASE = "https://github.com/MzeroMiko/VMamba/releases/download/%23v2cls"

SOURCES = [
    url_source(f"vssm_{size}_0229", f"vmamba_{size}", f"{_BASE}/vssm_{size}_0229_ckpt_epoch_{epoch}.pth", mb, "MIT",
               f"VMamba-{size[0].upper()} [s2l15], vmambav2_{size}_224 (README classification table)")
    for size, epoch, mb in (("small", 222, 192), ("base", 237, 338))
]
