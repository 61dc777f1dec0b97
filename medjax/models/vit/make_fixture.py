"""Regenerate the ViT family's fixtures (tests/fixtures/<name>) from the upstream PyTorch code; not run in CI.

    python -m medjax.models.vit.make_fixture NAME OUT_DIR [--upstream DIR]

NAME is one of the fixtures the `vit` package serves; each needs its upstream code:

| NAME | upstream | how to provide it |
|---|---|---|
| dinov2, dinov2_lc | github.com/facebookresearch/dinov2 @ b8931f7b | `--upstream` a checkout (without xFormers) |
| mae, deit | timm 1.0.31 (`VisionTransformer`, the class MAE's and DeiT's models are) | importable |
| clip, coca | open_clip_torch 3.3.0 | importable |
| biomedclip | open_clip_torch 3.3.0, timm 1.0.31, transformers (the tiny BERT text tower) | importable |
| aimv2 | github.com/apple/ml-aim @ bd9e0689 (`aim-v2/`, `aim-v1/`) | `--upstream` the repository root |
| hf_vit, hf_clip | transformers (`ViTModel`, `CLIPVisionModelWithProjection`) | importable |

timm and open_clip import torchvision; a CUDA build of torchvision imports on a CPU-only torch once its `nms` /
`qnms` operators are declared, which `--torchvision-shim` does (no torchvision operator runs).

Every fixture is made the same way (its README.md, written by hand, says so in full): the upstream model is built under
`torch.manual_seed(seed)` (its own init), every floating tensor of its state_dict is perturbed with
`medjax.models.fixtures.perturb_state_dict_` (generator seed + 1), the images are `torch.randn` from generator
seed + 2 (float32 NCHW), and the outputs are taken in eval mode under `torch.no_grad()` on CPU in float32. The script
writes the checkpoint in the official file format, `config.json` (the upstream constructor's kwargs plus `family`,
`format`, `upstream` and a `fixture` block), `images.npy` and `expected.npz`. With the versions the READMEs name,
the checkpoints' tensors, the images and the outputs equal the committed fixtures bit for bit, except as noted:

- float32 CPU results depend on the oneDNN kernels the CPU gets (the patch-embedding convolution): the fixtures
  `dinov2_lc`, `hf_vit` and `biomedclip` were made where oneDNN ran AVX2 kernels, the others where it ran AVX-512
  ones. The script sets `DNNL_MAX_CPU_ISA=AVX2` for the former (unless it is set), so that an AVX-512 machine
  reproduces them too; an AVX2-only machine cannot reproduce the AVX-512 ones' outputs (about 1e-6 apart).
- Checked on an AVX-512 machine with torch 2.13.0+cpu, timm 1.0.31, open_clip_torch 3.3.0, transformers 5.25.0:
  bit for bit (weights, images, outputs): dinov2, dinov2_lc, aimv2 (hf_native/ too), biomedclip, hf_vit, hf_clip.
  clip, coca: weights and images bit for bit, outputs within 3e-6 (the committed outputs come from a machine whose
  float32 kernels differ; no oneDNN/MKL setting reproduced them). mae, deit: images bit for bit; 0.3 % of the
  Linear weights' elements (161 and 341 values, 0.17 % and 0.23 % of all) differ by one ulp (timm's erfinv-based
  `trunc_normal_` init gave one-ulp-different values where the fixtures were made), hence outputs within 3e-6.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import os
import sys
import tempfile
from collections import OrderedDict

import numpy as np
import safetensors.torch
import torch
import transformers

from medjax.errors import UserError, cli_main
from medjax.models.fixtures import (
    import_upstream,
    perturb_state_dict_,
    seeded_images,
    torchvision_shim,
    versions,
    write_json,
)

DINOV2_COMMIT = "b8931f7bf91576930313be2c6d6af376033b35f0"
MAE_COMMIT = "efb2a8062c206524e35e47d04501ed4f544c0ae8"
DEIT_COMMIT = "7e160fe43f0252d17191b71cbb5826254114ea5b"
ML_AIM_COMMIT = "bd9e06893f3ad68bda56b34ac2158fda2680b7fc"
LN_EPS6 = "partial(torch.nn.LayerNorm, eps=1e-6)"


def _fixture(seed: int, shape, call: str, outputs, **extra) -> dict:
    return {"seed": seed, "perturb_seed": seed + 1, "image_seed": seed + 2, "images_shape": list(shape), **extra,
            "call": call, "outputs": list(outputs)}


def _build(seed: int, make):
    """`make()` under torch.manual_seed(seed), then the recipe's perturbation (seed + 1), in eval mode."""
    torch.manual_seed(seed)
    model = make()
    perturb_state_dict_(model, seed + 1)
    return model.eval()


def _write(out: str, config: dict, images, expected: dict) -> None:
    os.makedirs(out, exist_ok=True)
    np.save(os.path.join(out, "images.npy"), images.numpy())
    np.savez(os.path.join(out, "expected.npz"), **{k: v.detach().numpy() for k, v in expected.items()})
    write_json(os.path.join(out, "config.json"), config)


class _Capture:
    """Forward hooks that keep the named modules' outputs (or inputs) of the next forward."""

    def __init__(self, **modules):
        self.values = {}
        self.handles = [m.register_forward_hook(functools.partial(self._keep, name)) for name, m in modules.items()]

    def _keep(self, name, module, args, output):
        self.values[name] = output

    def close(self):
        for h in self.handles:
            h.remove()


# ------------------------------------------------------------------------------------------------------ DINOv2


DINOV2_KWARGS = dict(img_size=98, patch_size=14, in_chans=3, embed_dim=48, depth=2, num_heads=3, mlp_ratio=4.0,
                     qkv_bias=True, ffn_bias=True, proj_bias=True, drop_path_rate=0.0, drop_path_uniform=False,
                     init_values=1.0, ffn_layer="mlp", block_chunks=0, num_register_tokens=0,
                     interpolate_antialias=False, interpolate_offset=0.1)
DINOV2_BLOCK_FN = "partial(dinov2.layers.NestedTensorBlock, attn_class=dinov2.layers.MemEffAttention)"
DINOV2_OUTPUTS = ["x_norm_clstoken", "x_norm_patchtokens", "x_prenorm", "debug_x_norm_regtokens",
                  "debug_interpolated_pos_embed"]


def _dinov2_backbone(upstream: str):
    vits = import_upstream(upstream, "dinov2.models.vision_transformer")
    dl = import_upstream(None, "dinov2.layers")
    block_fn = functools.partial(dl.NestedTensorBlock, attn_class=dl.MemEffAttention)
    return lambda: vits.DinoVisionTransformer(**DINOV2_KWARGS, block_fn=block_fn)


def _dinov2_outputs(backbone, images) -> dict:
    f = backbone.forward_features(images)
    grid = images.shape[-1] // backbone.patch_size
    tokens = torch.zeros(1, 1 + grid * grid, backbone.embed_dim)
    return {"x_norm_clstoken": f["x_norm_clstoken"], "x_norm_patchtokens": f["x_norm_patchtokens"],
            "x_prenorm": f["x_prenorm"], "debug_x_norm_regtokens": f["x_norm_regtokens"],
            "debug_interpolated_pos_embed": backbone.interpolate_pos_encoding(tokens, images.shape[-1],
                                                                              images.shape[-2])}


def _dinov2_config(fmt: str, entry: str, fixture: dict, **extra) -> dict:
    return {**DINOV2_KWARGS, "block_fn": DINOV2_BLOCK_FN, "family": "dinov2", "format": fmt,
            "upstream": {"repo": "github.com/facebookresearch/dinov2", "commit": DINOV2_COMMIT, "entry": entry,
                         **extra.pop("upstream", {}), "versions": versions("transformers"), "xformers": False},
            **extra, "fixture": fixture}


def dinov2(out: str, upstream: str, seed: int = 1100) -> None:
    """Fixture A of `dinov2`: `DinoVisionTransformer` (the hub's block), model.forward_features at 56 px on a 7x7
    pos-embed grid (run-time bicubic interpolation); checkpoint.pth is a plain state_dict like the hub files."""
    model = _build(seed, _dinov2_backbone(upstream))
    images = seeded_images((2, 3, 56, 56), seed + 2)
    with torch.no_grad():
        expected = _dinov2_outputs(model, images)
    os.makedirs(out, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(out, "checkpoint.pth"))
    fixture = _fixture(seed, images.shape, "model.forward_features(images)", DINOV2_OUTPUTS,
                       pos_embed_grid=[7, 7], runtime_grid=[4, 4])
    fixture = {k: fixture[k] for k in ("seed", "perturb_seed", "image_seed", "images_shape", "call",
                                       "pos_embed_grid", "runtime_grid", "outputs")}
    config = _dinov2_config("torch.hub plain state_dict (.pth, torch.save of OrderedDict[str, Tensor]); "
                            "load_state_dict strict=True", "dinov2.models.vision_transformer.DinoVisionTransformer",
                            fixture)
    _write(out, config, images, expected)


def dinov2_lc(out: str, upstream: str, seed: int = 3800) -> None:
    """The hub's linear classifier `dinov2_vit*14_lc(layers=1)`: `_LinearClassifierWrapper(backbone, nn.Linear(96,
    1000), layers=1)`, perturbed in one walk over the wrapper's state_dict; checkpoint.pth is the backbone's plain
    state_dict, linear_head.pth the head's {weight, bias}."""
    classifiers = import_upstream(upstream, "dinov2.hub.classifiers")
    make_backbone = _dinov2_backbone(upstream)
    layers = 1

    def make():
        backbone = make_backbone()
        head = torch.nn.Linear((1 + layers) * backbone.embed_dim, 1000)
        return classifiers._LinearClassifierWrapper(backbone=backbone, linear_head=head, layers=layers)

    model = _build(seed, make)
    images = seeded_images((2, 3, 56, 56), seed + 2)
    head_input = {}
    hook = model.linear_head.register_forward_pre_hook(lambda m, args: head_input.setdefault("x", args[0]))
    with torch.no_grad():
        expected = _dinov2_outputs(model.backbone, images)
        expected["lc_logits"] = model(images)
    hook.remove()
    expected["lc_linear_input"] = head_input["x"]
    expected = {k: expected[k] for k in DINOV2_OUTPUTS + ["lc_linear_input", "lc_logits"]}
    os.makedirs(out, exist_ok=True)
    torch.save(model.backbone.state_dict(), os.path.join(out, "checkpoint.pth"))
    torch.save(model.linear_head.state_dict(), os.path.join(out, "linear_head.pth"))
    head = {"file": "linear_head.pth", "class": "torch.nn.Linear", "in_features": model.linear_head.in_features,
            "out_features": 1000, "bias": True, "layers": layers,
            "official_file_name": "dinov2_vit{s,b,l}14_linear_head.pth",
            "linear_input": "cat([x_norm_clstoken, x_norm_patchtokens.mean(1)], 1)"}
    fixture = _fixture(seed, images.shape, "f = model.backbone.forward_features(images); lc_logits = model(images) "
                       "(hub _LinearClassifierWrapper); lc_linear_input = the head's input", list(expected),
                       pos_embed_grid=[7, 7], runtime_grid=[4, 4])
    fixture = {k: fixture[k] for k in ("seed", "perturb_seed", "image_seed", "images_shape", "call",
                                       "pos_embed_grid", "runtime_grid", "outputs")}
    config = _dinov2_config(
        "checkpoint.pth: torch.hub plain backbone state_dict (like dinov2_vit*14[_reg4]_pretrain.pth), "
        "load_state_dict strict=True into DinoVisionTransformer; linear_head.pth: plain state_dict {weight, bias} of "
        "the hub's nn.Linear head (like dinov2_vit*14[_reg4]_linear[4]_head.pth)",
        "dinov2.hub.classifiers._LinearClassifierWrapper(backbone=dinov2.models.vision_transformer."
        "DinoVisionTransformer(**kwargs), linear_head=nn.Linear((1+layers)*embed_dim, 1000), layers=layers)",
        fixture, upstream={"hub_entry_equivalent": "dinov2_vit{s,b,l}14_lc(layers=1)"}, head=head)
    _write(out, config, images, expected)


# ------------------------------------------------------------------------------------------------ MAE, DeiT


def _timm_vit(kwargs: dict):
    vision_transformer = import_upstream(None, "timm.models.vision_transformer")
    return lambda: vision_transformer.VisionTransformer(
        **kwargs, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))


MAE_KWARGS = dict(img_size=64, patch_size=16, in_chans=3, embed_dim=48, depth=2, num_heads=3, mlp_ratio=4.0,
                  qkv_bias=True, num_classes=0, global_pool="")


def mae(out: str, upstream: str | None = None, seed: int = 1200) -> None:
    """MAE's encoder: timm's `VisionTransformer` (MAE's `models_vit.VisionTransformer` is a subclass; the released
    `mae_pretrain_vit_*.pth` hold its keys), no head, `forward_features` (the final norm over all tokens)."""
    model = _build(seed, _timm_vit(MAE_KWARGS))
    images = seeded_images((2, 3, 64, 64), seed + 2)
    with torch.no_grad():
        expected = {"x_norm": model.forward_features(images)}
    os.makedirs(out, exist_ok=True)
    torch.save({"model": model.state_dict()}, os.path.join(out, "checkpoint.pth"))
    config = {**MAE_KWARGS, "norm_layer": LN_EPS6, "family": "mae",
              "format": "torch.save({'model': state_dict}) (.pth) like dl.fbaipublicfiles.com/mae/pretrain/"
                        "mae_pretrain_vit_*.pth; load with strict=False after mae util.pos_embed.interpolate_pos_embed",
              "upstream": {"repo": "github.com/facebookresearch/mae", "commit": MAE_COMMIT,
                           "entry": "timm.models.vision_transformer.VisionTransformer (base class of mae "
                                    "models_vit.VisionTransformer, global_pool off)",
                           "versions": versions("timm")},
              "fixture": _fixture(seed, images.shape, "model.forward_features(images)  # final-LayerNorm-ed full "
                                  "sequence", expected, unexpected_keys_ignored=[])}
    config["fixture"]["unexpected_keys_ignored"] = config["fixture"].pop("unexpected_keys_ignored")
    _write(out, config, images, expected)


DEIT_KWARGS = dict(img_size=64, patch_size=16, in_chans=3, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4,
                   qkv_bias=True, num_classes=10)


def deit(out: str, upstream: str | None = None, seed: int = 1300) -> None:
    """DeiT's `deit_base_patch16_224` recipe (timm's `VisionTransformer`, LayerNorm eps 1e-6) with a 10-class head;
    checkpoint.pth is {'model': state_dict} like the released `deit_base_patch16_224-b5f2ef4d.pth`."""
    model = _build(seed, _timm_vit(DEIT_KWARGS))
    images = seeded_images((2, 3, 64, 64), seed + 2)
    with torch.no_grad():
        x_norm = model.forward_features(images)
        expected = {"x_norm_clstoken": x_norm[:, 0], "debug_x_norm": x_norm, "debug_logits": model.forward_head(x_norm)}
    os.makedirs(out, exist_ok=True)
    torch.save({"model": model.state_dict()}, os.path.join(out, "checkpoint.pth"))
    config = {**DEIT_KWARGS, "norm_layer": LN_EPS6, "family": "deit",
              "format": "torch.save({'model': state_dict}) (.pth) like dl.fbaipublicfiles.com/deit/"
                        "deit_base_patch16_224-b5f2ef4d.pth (includes head.weight/head.bias); "
                        "load_state_dict(strict=True)",
              "upstream": {"repo": "github.com/facebookresearch/deit", "commit": DEIT_COMMIT,
                           "entry": "deit models.py::deit_base_patch16_224 -> "
                                    "timm.models.vision_transformer.VisionTransformer",
                           "versions": versions("timm")},
              "fixture": _fixture(seed, images.shape, "x_norm = model.forward_features(images); "
                                  "logits = model.forward_head(x_norm)", expected)}
    _write(out, config, images, expected)


# ------------------------------------------------------------------------------------- open_clip: CLIP, CoCa


def _open_clip_visual_files(out: str, state: dict) -> int:
    """Keep the `visual.*` keys, saved under both names open_clip's hub loader looks for; returns how many were
    dropped."""
    visual = OrderedDict((k, v.contiguous()) for k, v in state.items() if k.startswith("visual."))
    os.makedirs(out, exist_ok=True)
    safetensors.torch.save_file(visual, os.path.join(out, "open_clip_model.safetensors"))
    torch.save(visual, os.path.join(out, "open_clip_pytorch_model.bin"))
    return len(state) - len(visual)


OPEN_CLIP_FORMAT = ("open_clip state_dict, HF-hub file names: open_clip_model.safetensors (safetensors) and "
                    "open_clip_pytorch_model.bin (torch.save of the same dict); ONLY the visual.* keys are kept (real "
                    "checkpoints also hold the text tower{} and logit_scale)")
CLIP_CONFIG = {"embed_dim": 32,
               "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
               "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}


def clip(out: str, upstream: str | None = None, seed: int = 1400) -> None:
    """open_clip's `CLIP` (ViT-B-16.json shrunk): `model.visual(images)` and its trunk's tokens, visual keys only."""
    open_clip_model = import_upstream(None, "open_clip.model")
    model = _build(seed, lambda: open_clip_model.CLIP(**CLIP_CONFIG))
    images = seeded_images((2, 3, 64, 64), seed + 2)
    visual = model.visual
    cap = _Capture(trunk=visual.transformer, ln_post=visual.ln_post)
    with torch.no_grad():
        pooled = visual(images)
    cap.close()
    ln_post = cap.values["ln_post"]
    expected = {"pooled": pooled, "tokens": ln_post[:, 1:], "debug_pooled_pre_proj": ln_post[:, 0],
                "debug_trunk_out": cap.values["trunk"]}
    dropped = _open_clip_visual_files(out, model.state_dict())
    config = {**CLIP_CONFIG, "family": "clip", "format": OPEN_CLIP_FORMAT.format(""),
              "upstream": {"package": "open-clip-torch", "version": importlib.metadata.version("open_clip_torch"),
                           "entry": "open_clip.model.CLIP(**config minus custom_text/family/format/upstream/fixture)",
                           "reference_config": "model_configs/ViT-B-16.json (pretrained laion2b_s34b_b88k)",
                           "versions": versions("timm", "open_clip_torch")},
              "fixture": _fixture(seed, images.shape, "pooled = model.visual(images)", expected, vision_heads=2,
                                  dropped_non_visual_keys=dropped)}
    config["fixture"]["dropped_non_visual_keys"] = config["fixture"].pop("dropped_non_visual_keys")
    _write(out, config, images, expected)


COCA_CONFIG = {"embed_dim": 32,
               "vision_cfg": {"image_size": 56, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8,
                              "attentional_pool": True, "attn_pooler_heads": 8, "output_tokens": True},
               "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1,
                            "embed_cls": True, "output_tokens": True},
               "multimodal_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1,
                                  "attn_pooler_heads": 2},
               "custom_text": True}


def coca(out: str, upstream: str | None = None, seed: int = 1500) -> None:
    """open_clip's `CoCa` (coca_ViT-B-32.json shrunk): the attentional pooler's 256 outputs, visual keys only."""
    coca_model = import_upstream(None, "open_clip.coca_model")
    kwargs = {k: v for k, v in COCA_CONFIG.items() if k != "custom_text"}
    model = _build(seed, lambda: coca_model.CoCa(**kwargs))
    images = seeded_images((2, 3, 56, 56), seed + 2)
    visual = model.visual
    cap = _Capture(trunk=visual.transformer, pool=visual.attn_pool, ln_post=visual.ln_post)
    with torch.no_grad():
        pooled, tokens = visual(images)
    cap.close()
    expected = {"pooled": pooled, "tokens": tokens, "debug_pooled_pre_proj": cap.values["ln_post"][:, 0],
                "debug_trunk_out": cap.values["trunk"], "debug_attn_pool_out": cap.values["pool"]}
    dropped = _open_clip_visual_files(out, model.state_dict())
    config = {**COCA_CONFIG, "family": "coca", "format": OPEN_CLIP_FORMAT.format(", text_decoder"),
              "upstream": {"package": "open-clip-torch", "version": importlib.metadata.version("open_clip_torch"),
                           "entry": "open_clip.coca_model.CoCa(**config minus custom_text/family/format/upstream/"
                                    "fixture)",
                           "reference_config": "model_configs/coca_ViT-B-32.json (pretrained laion2b_s13b_b90k)",
                           "versions": versions("timm", "open_clip_torch")},
              "fixture": _fixture(seed, images.shape, "pooled, tokens = model.visual(images)", expected,
                                  vision_heads=2, dropped_non_visual_keys=dropped)}
    config["fixture"]["dropped_non_visual_keys"] = config["fixture"].pop("dropped_non_visual_keys")
    _write(out, config, images, expected)


# --------------------------------------------------------------------------------------------------- BiomedCLIP


BIOMEDCLIP_TRUNK = {"embed_dim": 48, "depth": 2, "num_heads": 3, "img_size": 64}
BIOMEDCLIP_BERT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       max_position_embeddings=16)
BIOMEDBERT = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"


def _register_biomedclip_trunk() -> str:
    """A timm entry point whose body is timm's own `vit_base_patch16_224` with the tiny sizes: open_clip 3.3.0's
    `TimmModel` passes no size arguments to `timm.create_model`."""
    timm_models = import_upstream(None, "timm.models")
    vision_transformer = import_upstream(None, "timm.models.vision_transformer")
    name = "vit_base_patch16_224_fixture"
    if name not in timm_models.list_models(name):
        def vit_base_patch16_224_fixture(pretrained: bool = False, **kwargs):
            model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
            return vision_transformer._create_vision_transformer(
                "vit_base_patch16_224", pretrained=pretrained, **dict(model_args, **BIOMEDCLIP_TRUNK, **kwargs))
        timm_models.register_model(vit_base_patch16_224_fixture)
    return name


def biomedclip(out: str, upstream: str | None = None, seed: int = 3700) -> None:
    """open_clip's `CustomTextCLIP` as BiomedCLIP's hub config builds it (a timm `vit_base_patch16_224` image tower
    with a linear projection, a BERT text tower), tiny; the whole state_dict is saved as open_clip_pytorch_model.bin,
    with the legacy int64 `position_ids` buffer the real file holds."""
    open_clip_model = import_upstream(None, "open_clip.model")
    bert = transformers.BertConfig(**BIOMEDCLIP_BERT)
    vision_cfg = {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                  "timm_proj": "linear", "image_size": 64}
    text_cfg = {"hf_model_name": f"{BIOMEDBERT} (tiny stand-in, see hf_text_config)", "hf_tokenizer_name": BIOMEDBERT,
                "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 16}
    with tempfile.TemporaryDirectory() as bert_dir:
        bert.save_pretrained(bert_dir)
        model = _build(seed, lambda: open_clip_model.CustomTextCLIP(
            embed_dim=32, vision_cfg=dict(vision_cfg, timm_model_name=_register_biomedclip_trunk()),
            text_cfg=dict(text_cfg, hf_model_name=bert_dir, hf_model_pretrained=False)))
    images = seeded_images((2, 3, 64, 64), seed + 2)
    with torch.no_grad():
        expected = {"image_features": model.encode_image(images, normalize=False),
                    "trunk_tokens": model.visual.trunk.forward_features(images)}
    state = OrderedDict()
    for k, v in model.state_dict().items():
        if k == "text.transformer.embeddings.word_embeddings.weight":  # where the older transformers kept it
            state["text.transformer.embeddings.position_ids"] = torch.arange(bert.max_position_embeddings)[None]
        state[k] = v
    os.makedirs(out, exist_ok=True)
    torch.save(state, os.path.join(out, "open_clip_pytorch_model.bin"))
    config = {"embed_dim": 32,
              "vision_cfg": {**vision_cfg, "timm_model_kwargs": BIOMEDCLIP_TRUNK},
              "text_cfg": {**text_cfg, "hf_text_config": _bert_config_dict(bert)},
              "family": "biomedclip",
              "format": "open_clip CustomTextCLIP state_dict, torch.save'd as open_clip_pytorch_model.bin (the file "
                        "name of the hub repo microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224): "
                        "visual.trunk.* (timm VisionTransformer), visual.head.proj.weight, text.transformer.* (HF "
                        "BertModel, no pooler) incl. the legacy int64 text.transformer.embeddings.position_ids buffer, "
                        "text.proj.0/2.weight, logit_scale",
              "upstream": {"package": "open-clip-torch", "version": importlib.metadata.version("open_clip_torch"),
                           "entry": "open_clip.model.CustomTextCLIP(embed_dim, vision_cfg (-> open_clip.timm_model."
                                    "TimmModel -> timm.create_model(timm_model_name, **timm_model_kwargs)), text_cfg "
                                    "(-> open_clip.hf_model.HFTextEncoder(BertModel)))",
                           "reference_config": "hub microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 "
                                               "open_clip_config.json: embed_dim 512; vision_cfg {timm_model_name "
                                               "vit_base_patch16_224, timm_model_pretrained false, timm_pool '', "
                                               "timm_proj linear, image_size 224}; text_cfg {hf_model_name "
                                               f"{BIOMEDBERT}, hf_proj_type mlp, hf_pooler_type "
                                               "cls_last_hidden_state_pooler, context_length 256}",
                           "versions": versions("timm", "transformers", "open_clip_torch")},
              "fixture": _fixture(seed, images.shape, "image_features = model.encode_image(images, normalize=False) "
                                  "(= model.visual(images)); trunk_tokens = "
                                  "model.visual.trunk.forward_features(images)",
                                  expected, timm_model_kwargs_note=(
                                      "timm_model_kwargs is NOT an open_clip 3.3.0 CLIPVisionCfg field: the trunk was "
                                      "built through a timm entry point registered for the fixture that calls timm's "
                                      "own _create_vision_transformer('vit_base_patch16_224', **dict("
                                      "vit_base_patch16_224 args, **timm_model_kwargs)); real BiomedCLIP uses the "
                                      "stock entry point (embed 768, depth 12, heads 12, img 224)"))}
    _write(out, config, images, expected)


def _bert_config_dict(bert) -> dict:
    keys = ("transformers_version", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
            "max_position_embeddings", "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id",
            "use_cache", "classifier_dropout", "is_decoder", "add_cross_attention", "bos_token_id", "eos_token_id",
            "tie_word_embeddings", "model_type")
    d = bert.to_dict()
    return {k: d.get(k) for k in keys}


# -------------------------------------------------------------------------------------------------------- AIMv2


AIMV2_KWARGS = dict(img_size=56, patch_size=14, embed_dim=64, mlp_hidden_dim=176, num_blocks=2, num_heads=2,
                    num_channels=3, pos_embed_type="absolute", head_type=None)


def aimv2(out: str, upstream: str, seed: int = 1600) -> None:
    """apple/ml-aim's `AIMv2VisionEncoder` (the `aimv2_large` layout, no head), saved in ml-aim naming as
    model.safetensors, and the same weights in transformers' `Aimv2VisionModel` naming (`save_pretrained`) in
    hf_native/."""
    if not os.path.isdir(os.path.join(upstream, "aim-v2")):
        raise UserError(f"{upstream!r} is not an apple/ml-aim checkout (no aim-v2/ folder)")
    import_upstream(os.path.join(upstream, "aim-v1"), "aim.v1")
    models = import_upstream(os.path.join(upstream, "aim-v2"), "aim.v2.torch.models")
    model = _build(seed, lambda: models.AIMv2VisionEncoder(**AIMV2_KWARGS))
    images = seeded_images((2, 3, 56, 56), seed + 2)
    cap = _Capture(last_block=model.trunk.blocks[-1])
    with torch.no_grad():
        last = model(images)
    cap.close()
    expected = {"last_hidden_state": last, "debug_last_block_prenorm": cap.values["last_block"]}
    state = model.state_dict()
    os.makedirs(out, exist_ok=True)
    safetensors.torch.save_file(state, os.path.join(out, "model.safetensors"))
    hf_diff = _aimv2_hf_native(os.path.join(out, "hf_native"), state, images, last)
    config = {**AIMV2_KWARGS, "family": "aimv2",
              "format": "safetensors state_dict in apple/ml-aim torch naming (model.safetensors, as hf_hub_download'ed "
                        "by aim.v2.utils.load_pretrained at the pinned pre-transformers revisions); loads strict=True. "
                        "hf_native/ = same weights in transformers-native Aimv2VisionModel naming (save_pretrained).",
              "upstream": {"repo": "github.com/apple/ml-aim", "commit": ML_AIM_COMMIT,
                           "entry": "aim.v2.torch.models.AIMv2VisionEncoder (== aimv2_large/aimv2_huge factory "
                                    "layout)", "versions": versions("transformers")},
              "fixture": _fixture(seed, images.shape, "model(images)  # -> post_trunk_norm(trunk(preprocessor(x)))",
                                  expected, hf_native={"dir": "hf_native", "cls": "transformers.Aimv2VisionModel",
                                                       "transformers": transformers.__version__,
                                                       "max_abs_diff_vs_expected": hf_diff,
                                                       "attn_implementation_checked": "eager"})}
    config["fixture"]["hf_native"] = config["fixture"].pop("hf_native")
    _write(out, config, images, expected)


def _aimv2_hf_native(out: str, state: dict, images, last) -> float:
    """The ml-aim weights in transformers' `Aimv2VisionModel` naming, written by `save_pretrained`; returns its
    largest difference from the ml-aim output."""
    config = transformers.Aimv2VisionConfig(
        hidden_size=AIMV2_KWARGS["embed_dim"], intermediate_size=AIMV2_KWARGS["mlp_hidden_dim"],
        num_hidden_layers=AIMV2_KWARGS["num_blocks"], num_attention_heads=AIMV2_KWARGS["num_heads"],
        num_channels=3, image_size=AIMV2_KWARGS["img_size"], patch_size=AIMV2_KWARGS["patch_size"],
        rms_norm_eps=1e-5, qkv_bias=False, mlp_bias=False, use_head=False, is_native=False,
        attn_implementation="eager")
    hf = transformers.Aimv2VisionModel(config).eval()
    names = {"preprocessor.patchifier.proj": "embeddings.patch_embed", "preprocessor.patchifier.norm":
             "embeddings.rms_norm", "trunk.post_trunk_norm": "rms_norm"}
    block = {"norm_1": "rms_norm1", "norm_2": "rms_norm2", "attn.proj": "attention.out_proj",
             "mlp.fc1": "ffn.gate_proj", "mlp.fc2": "ffn.down_proj", "mlp.fc3": "ffn.up_proj"}
    mapped = {}
    for key, value in state.items():
        if key == "preprocessor.pos_embed":
            mapped["embeddings.position_embedding.weight"] = value[0]
            continue
        module, leaf = key.rsplit(".", 1)
        if module.startswith("trunk.blocks."):
            _, _, i, rest = module.split(".", 3)
            if rest == "attn.qkv":
                for name, part in zip("qkv", value.chunk(3, dim=0)):
                    mapped[f"encoder.layers.{i}.attention.{name}_proj.{leaf}"] = part
                continue
            module = f"encoder.layers.{i}.{block[rest]}"
        else:
            module = names[module]
        mapped[f"{module}.{leaf}"] = value
    hf.load_state_dict(mapped, strict=True)
    with torch.no_grad():
        diff = (hf(pixel_values=images).last_hidden_state - last).abs().max().item()
    hf.save_pretrained(out)
    return diff


# ------------------------------------------------------------------------------------------- transformers


def _hf(out: str, model, family: str, entry: str, seed: int, call: str, run) -> None:
    images = seeded_images((2, 3, 32, 32), seed + 2)
    with torch.no_grad():
        expected = run(model, images)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    config.update({"family": family, "format": "transformers",
                   "upstream": {"entry": entry, "package": "transformers", "version": transformers.__version__,
                                "versions": versions("transformers", "safetensors")},
                   "fixture": {**_fixture(seed, images.shape, call, expected), "attn_implementation": "sdpa"}})
    np.save(os.path.join(out, "images.npy"), images.numpy())
    np.savez(os.path.join(out, "expected.npz"), **{k: v.numpy() for k, v in expected.items()})
    write_json(os.path.join(out, "config.json"), config, sort_keys=True)


HF_VIT = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=192, image_size=32,
              patch_size=8)
HF_CLIP = dict(HF_VIT, projection_dim=24, hidden_act="quick_gelu")


def hf_vit(out: str, upstream: str | None = None, seed: int = 3500) -> None:
    """transformers' `ViTModel` with its pooler (the google/vit-*-patch16-224 layout), sdpa attention."""
    config = transformers.ViTConfig(**HF_VIT, attn_implementation="sdpa")
    model = _build(seed, lambda: transformers.ViTModel(config, add_pooling_layer=True))

    def run(model, images):
        o = model(pixel_values=images)
        return {"last_hidden_state": o.last_hidden_state, "cls": o.last_hidden_state[:, 0],
                "pooler_output": o.pooler_output}

    _hf(out, model, "hf_vit", "transformers.ViTModel(config, add_pooling_layer=True)", seed,
        "o = model(pixel_values=images)", run)


def hf_clip(out: str, upstream: str | None = None, seed: int = 3600) -> None:
    """transformers' `CLIPVisionModelWithProjection` (the openai/clip-vit-* vision half), quick_gelu, sdpa."""
    config = transformers.CLIPVisionConfig(**HF_CLIP, attn_implementation="sdpa")
    model = _build(seed, lambda: transformers.CLIPVisionModelWithProjection(config))

    def run(model, images):
        o = model.vision_model(pixel_values=images)
        return {"last_hidden_state": o.last_hidden_state, "pooler_output": o.pooler_output,
                "image_embeds": model.visual_projection(o.pooler_output)}

    _hf(out, model, "hf_clip", "transformers.CLIPVisionModelWithProjection(config)", seed,
        "o = model.vision_model(pixel_values=images); image_embeds = model.visual_projection(o.pooler_output)", run)


FIXTURES = {"dinov2": dinov2, "dinov2_lc": dinov2_lc, "mae": mae, "deit": deit, "clip": clip, "coca": coca,
            "biomedclip": biomedclip, "aimv2": aimv2, "hf_vit": hf_vit, "hf_clip": hf_clip}
NEEDS_CHECKOUT = ("dinov2", "dinov2_lc", "aimv2")
ONEDNN_AVX2 = ("dinov2_lc", "hf_vit", "biomedclip")  # made where oneDNN ran AVX2 kernels (see the docstring)


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m medjax.models.vit.make_fixture", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(FIXTURES), help="which fixture")
    p.add_argument("out", help="the folder to write (created)")
    p.add_argument("--upstream", help="the upstream checkout (dinov2, dinov2_lc: facebookresearch/dinov2; aimv2: "
                                      "apple/ml-aim)")
    p.add_argument("--seed", type=int, help="the model seed (default: the committed fixture's)")
    p.add_argument("--torchvision-shim", action="store_true",
                   help="declare torchvision::nms/qnms first (a CUDA torchvision build on CPU-only torch)")
    a = p.parse_args(argv)
    if a.name in NEEDS_CHECKOUT and not a.upstream:
        p.error(f"{a.name} needs --upstream (the upstream checkout)")
    if a.name in ONEDNN_AVX2:
        os.environ.setdefault("DNNL_MAX_CPU_ISA", "AVX2")  # read by oneDNN at its first kernel, after this line
    if a.torchvision_shim:
        torchvision_shim()
    kwargs = {} if a.seed is None else {"seed": a.seed}
    FIXTURES[a.name](a.out, a.upstream, **kwargs)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
