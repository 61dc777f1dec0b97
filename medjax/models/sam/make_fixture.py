"""Regenerate tests/fixtures/sam_vit from the upstream segment_anything (SAM v1) code; not run in CI.

    python -m medjax.models.sam.make_fixture OUT_DIR [--torchvision-shim]

The fixture's recipe (its README.md says it in full): a whole tiny `segment_anything.modeling.Sam` (ImageEncoderViT
with ENCODER's kwargs, a PromptEncoder and a MaskDecoder with a TwoWayTransformer, built in that order as
`build_sam._build_sam` does) under `torch.manual_seed(3400)`; every floating tensor of its state dict perturbed with
`medjax.models.fixtures.perturb_state_dict_` (seed 3401); images `torch.randn(2, 3, 64, 64)` from generator seed 3402
fed straight to `sam.image_encoder` (no `sam.preprocess`) in eval mode, float32, CPU. Writes `checkpoint.pth`
(`torch.save(sam.state_dict())`, the layout of the official sam_vit_*.pth files), `config.json`, `images.npy` and
`expected.npz`: `trunk_tokens` (the last block's output, NHWC, by a forward hook), `pooled` (its mean over positions),
`image_embeddings` (the neck's output, NCHW) and `debug_neck_pooled` (its mean). With segment-anything 1.0 and torch
2.13.0 (CPU) the checkpoint's tensors, the images and the outputs equal the committed fixture bit for bit (the
outputs with the kernels limited to AVX2, the default `--cpu avx2`: AVX-512's LayerNorm / softmax round differently).
segment_anything imports torchvision: `--torchvision-shim` lets PyPI's CUDA build import on a CPU-only torch.
"""

from __future__ import annotations

import functools
import sys

import torch

from medjax.models import fixtures

SEED = 3400
ENCODER = dict(img_size=64, patch_size=16, in_chans=3, embed_dim=48, depth=2, num_heads=3, mlp_ratio=4.0, out_chans=32,
               qkv_bias=True, use_abs_pos=True, use_rel_pos=True, rel_pos_zero_init=False, window_size=3,
               global_attn_indexes=[1])
PROMPT = dict(embed_dim=32, image_embedding_size=[4, 4], input_image_size=[64, 64], mask_in_chans=4)
DECODER = dict(transformer_dim=32, num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=32)
TRANSFORMER = dict(depth=2, embedding_dim=32, mlp_dim=64, num_heads=2)


def build(sam):
    return sam.Sam(
        image_encoder=sam.ImageEncoderViT(**{**ENCODER, "global_attn_indexes": tuple(ENCODER["global_attn_indexes"])},
                                          norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
                                          act_layer=torch.nn.GELU),
        prompt_encoder=sam.PromptEncoder(**{k: tuple(v) if isinstance(v, list) else v for k, v in PROMPT.items()}),
        mask_decoder=sam.MaskDecoder(**DECODER, transformer=sam.TwoWayTransformer(**TRANSFORMER)))


class _RecipeNames:
    """The Sam's state dict under the names the recipe classified: the mask decoder's `mask_tokens` (an nn.Embedding)
    got the weight-matrix noise 0.5 / sqrt(fan_in), not the learned-token noise 0.5 that its name's substring
    `mask_token` gets from `fixtures.perturb_state_dict_`; same tensors, same order, so the same draws."""

    def __init__(self, model):
        self.model = model

    def state_dict(self):
        return {k.replace("mask_tokens", "mask_queries"): v for k, v in self.model.state_dict().items()}


def make(out: str) -> None:
    sam_modeling = fixtures.import_upstream(None, "segment_anything.modeling")
    torch.manual_seed(SEED)
    sam = build(sam_modeling).eval()
    fixtures.perturb_state_dict_(_RecipeNames(sam), SEED + 1)
    images = fixtures.seeded_images((2, 3, 64, 64), SEED + 2)
    with torch.no_grad():
        got = fixtures.hooked(sam.image_encoder, images, {"trunk_tokens": sam.image_encoder.blocks[-1]})
    outputs = {"trunk_tokens": got["trunk_tokens"], "pooled": got["trunk_tokens"].mean(dim=(1, 2)),
               "image_embeddings": got["logits"], "debug_neck_pooled": got["logits"].mean(dim=(2, 3))}
    versions = fixtures.versions("segment-anything", "torchvision")
    config = {
        **ENCODER, "norm_layer": "partial(torch.nn.LayerNorm, eps=1e-6)", "act_layer": "torch.nn.GELU",
        "family": "sam_vit",
        "format": "torch.save(sam.state_dict()) (.pth, plain OrderedDict) of a whole segment_anything.modeling.Sam, "
                  "like dl.fbaipublicfiles.com/segment_anything/sam_vit_{b,l,h}_*.pth: image_encoder.* "
                  "(ImageEncoderViT), prompt_encoder.*, mask_decoder.*; pixel_mean/pixel_std are NON-persistent "
                  "buffers upstream, so they are not in the file; load_state_dict strict=True into Sam",
        "upstream": {"package": "segment-anything", "version": versions["segment-anything"],
                     "repo": "github.com/facebookresearch/segment-anything (PyPI segment-anything 1.0)",
                     "entry": "segment_anything.modeling.ImageEncoderViT(**kwargs) inside Sam(image_encoder, "
                              "PromptEncoder(...), MaskDecoder(...)) as in segment_anything.build_sam._build_sam",
                     "versions": versions},
        "prompt_encoder": PROMPT,
        "mask_decoder": {**DECODER, "transformer": {"class": "TwoWayTransformer", **TRANSFORMER}},
        "fixture": {"seed": SEED, "perturb_seed": SEED + 1, "image_seed": SEED + 2, "images_shape": list(images.shape),
                    "call": "image_embeddings = sam.image_encoder(images) (images fed directly: no sam.preprocess, no "
                            "pixel_mean/std, no resize/pad); trunk_tokens = output of image_encoder.blocks[-1] "
                            "(forward hook); pooled = trunk_tokens.mean(dim=(1, 2))",
                    "outputs": list(outputs)}}
    fixtures.save_fixture(out, config, images, outputs, {"checkpoint.pth": sam.state_dict()})


def main(argv=None) -> int:
    return fixtures.fixture_main(make, "sam", argv)


if __name__ == "__main__":
    sys.exit(main())
