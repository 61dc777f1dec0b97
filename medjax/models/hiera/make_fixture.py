"""Regenerate the sam2_hiera fixture (tests/fixtures/sam2_hiera) from the upstream SAM 2 code; not run in CI.

    python -m medjax.models.hiera.make_fixture OUT_DIR --upstream SAM2_CHECKOUT [--seed 101]

SAM2_CHECKOUT is a checkout of github.com/facebookresearch/sam2 @ 2b90b9f5 (the fixture's commit; the CUDA extension
need not be built); `sam2/__init__.py` and `hieradet.py` import hydra-core and iopath, which must be importable
(`pip install --target DIR hydra-core==1.3.8 iopath==0.1.10 omegaconf antlr4-python3-runtime==4.9.3 portalocker`,
then `PYTHONPATH=...:DIR`). The recipe, as the fixture's README states it:

- `torch.manual_seed(seed)`, then `ImageEncoder(trunk=Hiera(**trunk), neck=FpnNeck(PositionEmbeddingSine(...), ...),
  scalp=1)` with the tiny config below (stage-3 windows zero-padded, as SAM2-L's are at 224 px);
- one generator `torch.Generator().manual_seed(seed + 1)` walking the state_dict twice: first `pos_embed` and
  `pos_embed_window` += N(0, 0.5) and every other tensor that is constant after init (the LayerNorms) += N(0, 0.2)
  (weight matrices keep the upstream init; no draw for them), then every tensor += N(0, 0.02);
- images: `torch.randn((2, 3, 96, 96))` from generator seed + 2; 22 dummy non-encoder keys with real SAM2Base names:
  N(0, 1) * 0.1 from generator seed + 3, in the order listed in `DUMMIES`;
- outputs in eval mode under `torch.no_grad()`: `vision_features` of `image_encoder(images)` and the trunk's four
  stage outputs (a forward hook on `image_encoder.trunk`), NCHW.

Writes checkpoint.pt (`{'model': state_dict}` in the whole-SAM2Base key space, like `sam2.1_hiera_*.pt`),
config.json, images.npy and expected.npz; the README is written by hand. Checked on an AVX-512 machine with torch
2.13.0+cpu, hydra-core 1.3.8, iopath 0.1.10: the checkpoint's 136 tensors (the dummies included) and the images equal
the committed fixture's bit for bit, and so do `trunk_stage1` and `trunk_stage2`; `trunk_stage3`, `trunk_stage4` and
`vision_features` differ by up to 1.1e-6 (float32 kernel differences between this machine and the one that made the
fixture, from the stage-3 blocks on; no SDPA backend, thread count, oneDNN or MKL setting reproduced them).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

from medjax.errors import cli_main
from medjax.models.fixtures import fixture_main, import_upstream, seeded_images, versions, write_json

COMMIT = "2b90b9f5ceec907a1c18123530e92e794ad901a4"
TRUNK = {"embed_dim": 16, "num_heads": 1, "drop_path_rate": 0.0, "q_pool": 3, "q_stride": [2, 2],
         "stages": [1, 2, 3, 2], "dim_mul": 2.0, "head_mul": 2.0, "window_pos_embed_bkg_spatial_size": [4, 4],
         "window_spec": [8, 4, 4, 2], "global_att_blocks": [5], "return_interm_layers": True}
POSITION_ENCODING = {"num_pos_feats": 32, "normalize": True, "scale": None, "temperature": 10000}
NECK = {"d_model": 32, "backbone_channel_list": [128, 64, 32, 16], "kernel_size": 1, "stride": 1, "padding": 0,
        "fpn_interp_model": "nearest", "fuse_type": "sum", "fpn_top_down_levels": [2, 3]}
SCALP = 1
# SAM2Base's keys outside the image encoder (a few of each kind), with small shapes: `before` the encoder's keys in
# the state_dict (SAM2Base's own parameters) or after them
DUMMIES = [("maskmem_tpos_enc", (7, 1, 1, 64), True), ("no_mem_embed", (1, 1, 32), True),
           ("no_mem_pos_enc", (1, 1, 32), True), ("no_obj_ptr", (1, 32), True),
           ("no_obj_embed_spatial", (1, 64), True),
           ("mask_downsample.weight", (1, 1, 4, 4), False), ("mask_downsample.bias", (1,), False),
           ("memory_attention.layers.0.self_attn.q_proj.weight", (32, 32), False),
           ("memory_attention.layers.0.self_attn.q_proj.bias", (32,), False),
           ("memory_encoder.pix_feat_proj.weight", (32, 32, 1, 1), False),
           ("memory_encoder.pix_feat_proj.bias", (32,), False),
           ("sam_prompt_encoder.point_embeddings.0.weight", (1, 32), False),
           ("sam_mask_decoder.transformer.layers.0.self_attn.q_proj.weight", (32, 32), False),
           ("sam_mask_decoder.transformer.layers.0.self_attn.q_proj.bias", (32,), False),
           ("sam_mask_decoder.iou_token.weight", (1, 32), False),
           ("sam_mask_decoder.mask_tokens.weight", (4, 32), False),
           ("sam_mask_decoder.conv_s0.weight", (4, 32, 1, 1), False), ("sam_mask_decoder.conv_s0.bias", (4,), False),
           ("sam_mask_decoder.conv_s1.weight", (8, 32, 1, 1), False), ("sam_mask_decoder.conv_s1.bias", (8,), False),
           ("obj_ptr_proj.layers.0.weight", (32, 32), False), ("obj_ptr_proj.layers.0.bias", (32,), False)]
OUTPUTS = ["vision_features", "trunk_stage1", "trunk_stage2", "trunk_stage3", "trunk_stage4"]


def rerandomize_(model, seed: int) -> None:
    """The fixture's two passes over the state_dict from one generator: the pos-embeds += N(0, 0.5), the tensors that
    are constant after init += N(0, 0.2), then every tensor += N(0, 0.02)."""
    gen = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    with torch.no_grad():
        for name, t in state.items():
            if "pos_embed" in name:
                t.add_(torch.randn(t.shape, generator=gen) * 0.5)
            elif bool((t == t.flatten()[0]).all()):
                t.add_(torch.randn(t.shape, generator=gen) * 0.2)
        for t in state.values():
            t.add_(torch.randn(t.shape, generator=gen) * 0.02)


def make(out: str, upstream: str, seed: int = 101) -> None:
    hieradet = import_upstream(upstream, "sam2.modeling.backbones.hieradet")
    image_encoder = import_upstream(None, "sam2.modeling.backbones.image_encoder")
    position_encoding = import_upstream(None, "sam2.modeling.position_encoding")
    torch.manual_seed(seed)
    encoder = image_encoder.ImageEncoder(
        trunk=hieradet.Hiera(**TRUNK),
        neck=image_encoder.FpnNeck(position_encoding=position_encoding.PositionEmbeddingSine(**POSITION_ENCODING),
                                   **NECK),
        scalp=SCALP)
    rerandomize_(encoder, seed + 1)
    encoder.eval()
    images = seeded_images((2, 3, 96, 96), seed + 2)
    stages = []
    hook = encoder.trunk.register_forward_hook(lambda m, args, output: stages.extend(output))
    with torch.no_grad():
        out_features = encoder(images)
    hook.remove()
    expected = {"vision_features": out_features["vision_features"],
                **{f"trunk_stage{i + 1}": s for i, s in enumerate(stages)}}

    gen = torch.Generator().manual_seed(seed + 3)
    dummies = {name: (torch.randn(shape, generator=gen) * 0.1, before) for name, shape, before in DUMMIES}
    state = {k: v for k, (v, before) in dummies.items() if before}
    state.update({f"image_encoder.{k}": v for k, v in encoder.state_dict().items()})
    state.update({k: v for k, (v, before) in dummies.items() if not before})

    os.makedirs(out, exist_ok=True)
    torch.save({"model": state}, os.path.join(out, "checkpoint.pt"))
    np.save(os.path.join(out, "images.npy"), images.numpy())
    np.savez(os.path.join(out, "expected.npz"), **{k: v.numpy() for k, v in expected.items()})
    config = {
        "scalp": SCALP, "trunk": TRUNK, "neck": {"position_encoding": POSITION_ENCODING, **NECK},
        "family": "sam2_hiera",
        "format": "torch.save({'model': state_dict}) (.pt) like sam2.1_hiera_base_plus.pt: whole-SAM2Base key space; "
                  "the image encoder is under 'image_encoder.' (trunk.* = Hiera, neck.* = FpnNeck); other keys "
                  "(sam_mask_decoder.*, memory_*, no_mem_*, ...) are dummies to ignore",
        "upstream": {"repo": "github.com/facebookresearch/sam2", "commit": COMMIT,
                     "entry": "sam2.modeling.backbones.image_encoder.ImageEncoder(trunk=hieradet.Hiera(**trunk), "
                              "neck=FpnNeck(position_encoding=position_encoding.PositionEmbeddingSine("
                              "**neck.position_encoding), **neck), scalp=scalp)",
                     "yaml_equivalent": "sam2/configs/sam2.1/sam2.1_hiera_*.yaml model.image_encoder subtree",
                     "versions": versions("hydra-core", "iopath")},
        "fixture": {"seed": seed, "perturb_seed": seed + 1, "image_seed": seed + 2, "dummy_seed": seed + 3,
                    "images_shape": list(images.shape),
                    "call": "out = image_encoder.eval()(images) under torch.no_grad(); vision_features = "
                            "out['vision_features']; trunk_stageN = image_encoder.trunk(images)[N-1]",
                    "outputs": OUTPUTS}}
    write_json(os.path.join(out, "config.json"), config)


@cli_main
def main(argv=None) -> int:
    return fixture_main(make, "hiera", argv, upstream="a checkout of github.com/facebookresearch/sam2", seed=101,
                        cpu="native")


if __name__ == "__main__":
    sys.exit(main())
