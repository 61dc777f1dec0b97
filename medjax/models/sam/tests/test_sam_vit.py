"""The SAM v1 image encoder (`sam_vit`): the official-format fixture through both CLIs, transformers' SamModel /
SamVisionModel with perturbed weights (native size, other sizes with rel-pos table interpolation, the pos-embed
resize), parameter counts, and a full-width ViT-L encoder at 1024 px."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from medjax import models, pretrained, testing
from medjax.convert import convert
from medjax.models.sam import SamViTConfig
from medjax.models.sam import convert as sam
from medjax.testing import PARITY_TOL, fixture_path, max_abs, perturb_

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("layout", ["whole_sam", "image_encoder_only"])
def test_fixture_parity_through_clis(tmp_path, layout):
    """The official whole-SAM file (image_encoder.* selected, prompt encoder and mask decoder skipped) and the same
    encoder saved alone, through `python -m converters` and `python -m medjax.embed`."""
    checkpoint = fixture_path("sam_vit", "checkpoint.pth")
    if layout == "image_encoder_only":
        state = torch.load(checkpoint, weights_only=True)
        torch.save({k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")},
                   tmp_path / "encoder.pth")
        checkpoint = str(tmp_path / "encoder.pth")
    got, expected, _ = testing.convert_and_embed(tmp_path, "sam_vit", checkpoint, "sam_vit",
                                                 fixture_path("sam_vit", "config.json"))
    testing.assert_fixture_outputs(got, expected, "sam_vit")
    assert max_abs(got["linear_head_input"], expected["pooled"]) <= PARITY_TOL
    assert max_abs(got["attention_head_input"], expected["trunk_tokens"].reshape(2, 16, 48)) <= PARITY_TOL
    meta = pretrained.read_metadata(str(tmp_path / "params"))  # where testing.convert_and_embed converts
    assert meta["source"]["format"] == ("sam_official" if layout == "whole_sam" else "sam_image_encoder")
    state = torch.load(fixture_path("sam_vit", "checkpoint.pth"), weights_only=True)
    assert meta["num_params"] == sum(v.numel() for k, v in state.items() if k.startswith("image_encoder."))


# ------------------------------------------------------------------------------------------------ transformers

def _hf_sam(seed=0, **kw):
    cfg = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, image_size=96, patch_size=16, window_size=4,
               global_attn_indexes=[1], output_channels=16, mlp_dim=96)
    torch.manual_seed(seed)
    config = transformers.SamVisionConfig(**(cfg | kw))
    return perturb_(transformers.SamModel(transformers.SamConfig(vision_config=config.to_dict())), seed=seed + 1)


def _reference(encoder, images, pos_embed=None):
    """SamVisionEncoder's forward written out with its own modules (its size check bypassed, so other input sizes
    run; the layers' get_rel_pos interpolates the tables as upstream does): (trunk tokens NHWC, neck output NCHW)."""
    with torch.no_grad():
        x = encoder.patch_embed.projection(torch.from_numpy(images)).permute(0, 2, 3, 1)
        if pos_embed is not None:
            x = x + pos_embed
        for layer in encoder.layers:
            x = layer(x)
            x = x[0] if isinstance(x, tuple) else x
        return x.numpy(), encoder.neck(x).numpy()


def _convert_and_run(model, tmp_path, images, name="sam"):
    model.eval()
    model.save_pretrained(tmp_path / name)
    meta = convert(str(tmp_path / name), str(tmp_path / f"{name}_jx"), "sam_vit")
    config, variables, _ = models.load_pretrained(str(tmp_path / f"{name}_jx"))
    with jax.default_matmul_precision("float32"):
        out = models.build_backbone(config).apply(variables, jnp.asarray(images.transpose(0, 2, 3, 1)))
    return meta, config, {k: np.asarray(v) for k, v in out.items()}


def _images(batch, height, width, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 3, height, width)).astype(np.float32)


def test_transformers_sam_model_native_size(tmp_path):
    """A whole SamModel file (vision_encoder.* selected): 6x6 grid with window 4 (padded to 8x8), one global block."""
    model = _hf_sam()
    images = _images(2, 96, 96)
    with torch.no_grad():
        neck = model.vision_encoder(pixel_values=torch.from_numpy(images)).last_hidden_state.numpy()
    trunk, neck_ref = _reference(model.vision_encoder, images, model.vision_encoder.pos_embed)
    assert max_abs(neck_ref, neck) <= 1e-6  # the written-out reference is the model's own forward
    meta, config, got = _convert_and_run(model, tmp_path, images)
    assert meta["source"]["format"] == "sam_transformers"
    assert meta["num_params"] == sum(p.numel() for p in model.vision_encoder.parameters())
    assert (config.window_size, config.global_attn_indexes, config.norm_eps) == (4, (1,), 1e-6)
    for key, ref in {"trunk_tokens": trunk, "image_embeddings": neck, "pooled": trunk.mean(axis=(1, 2))}.items():
        assert max_abs(got[key], ref) <= PARITY_TOL, key


def test_other_input_sizes_interpolate_the_rel_pos_tables(tmp_path):
    """Without the absolute pos-embed upstream runs at any size: a non-square 112x80 input (7x5 grid) pads the
    3x3 windows and resizes the global block's 11-long tables to 13 and 9 (F.interpolate, linear)."""
    model = _hf_sam(seed=2, use_abs_pos=False, window_size=3, image_size=96)
    images = _images(2, 112, 80, seed=1)
    trunk, neck = _reference(model.vision_encoder, images)
    _, config, got = _convert_and_run(model, tmp_path, images)
    assert not config.use_abs_pos
    assert max_abs(got["trunk_tokens"], trunk) <= PARITY_TOL
    assert max_abs(got["image_embeddings"], neck) <= PARITY_TOL


def test_pos_embed_resize_at_other_input_sizes(tmp_path):
    """medjax's extension: at 128 px (8x8 grid) the stored 6x6 pos-embed is resized like torch's
    F.interpolate(mode='bicubic', align_corners=False) on the NCHW table, then added."""
    model = _hf_sam(seed=4)
    images = _images(1, 128, 128, seed=2)
    pos = model.vision_encoder.pos_embed.detach().permute(0, 3, 1, 2)
    pos = torch.nn.functional.interpolate(pos, size=(8, 8), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    trunk, neck = _reference(model.vision_encoder, images, pos)
    _, _, got = _convert_and_run(model, tmp_path, images)
    assert max_abs(got["trunk_tokens"], trunk) <= PARITY_TOL
    assert max_abs(got["image_embeddings"], neck) <= PARITY_TOL


def test_rel_pos_linear_resize_matches_torch():
    from medjax.models.sam.model import get_rel_pos

    table = torch.randn(27, 16)
    for q in (5, 9, 14, 32, 64):
        ref = torch.nn.functional.interpolate(table.T[None], size=2 * q - 1, mode="linear")[0].T
        index = torch.arange(q)[:, None] - torch.arange(q)[None, :] + q - 1
        got = get_rel_pos(q, q, jnp.asarray(table.numpy()))
        assert max_abs(got, ref[index].numpy()) <= 1e-6, q


# ------------------------------------------------------------------------------------------------ variants


def _upstream_count(dim, depth, heads, global_attn, window=14, grid=64, out=256, mlp_ratio=4, patch=16):
    """ImageEncoderViT's parameters, summed from its constructor (segment_anything/modeling/image_encoder.py)."""
    head_dim = dim // heads
    total = 3 * patch * patch * dim + dim + grid * grid * dim  # patch_embed.proj, pos_embed
    for i in range(depth):
        size = grid if i in global_attn else window
        total += 4 * dim  # norm1, norm2
        total += 3 * dim * dim + 3 * dim + dim * dim + dim  # attn.qkv, attn.proj
        total += 2 * (2 * size - 1) * head_dim  # attn.rel_pos_h, rel_pos_w
        total += 2 * mlp_ratio * dim * dim + mlp_ratio * dim + dim  # mlp.lin1, mlp.lin2
    return total + dim * out + 2 * out + out * out * 9 + 2 * out  # neck: conv 1x1, LayerNorm2d, conv 3x3, LayerNorm2d


@pytest.mark.parametrize("name,upstream", [("sam_vit_b", (768, 12, 12, (2, 5, 8, 11))),
                                           ("sam_vit_l", (1024, 24, 16, (5, 11, 17, 23))),
                                           ("sam_vit_h", (1280, 32, 16, (7, 15, 23, 31)))])
def test_variant_parameter_counts(name, upstream):
    family, kwargs = sam.VARIANTS[name]
    ours = models.count_params(models.param_shapes(sam.parse_config(kwargs)))
    dim, depth, heads, global_attn = upstream
    with torch.device("meta"):
        hf = transformers.SamVisionModel(transformers.SamVisionConfig(
            hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, global_attn_indexes=list(global_attn),
            mlp_dim=4 * dim))
    assert ours == _upstream_count(*upstream) == sum(p.numel() for p in hf.parameters())
    if name == "sam_vit_l":
        assert ours == 308_278_272


def test_family_facts():
    config = sam.parse_config(sam.VARIANTS["sam_vit_b"][1])
    family, paths, depth = testing.layer_depths("sam_vit", config)
    assert depth["patch_embed/kernel"] == depth["pos_embed"] == 0
    assert depth["blocks_0/attn/rel_pos_h"] == 1 and depth["blocks_11/mlp/fc2/bias"] == 12
    assert depth["neck/conv2/kernel"] == 13
    lora = testing.lora_paths(family, config, paths)
    assert len(lora) == 12 * 3 and all(p.endswith("kernel") for p in lora)
    assert family.stem in paths


def test_remat_gives_the_plain_outputs_and_gradients():
    """model.remat recomputes each block in the backward pass: the same outputs and parameter gradients as the plain
    encoder (windowed and global blocks, float32); model.scan is refused in one line."""
    from medjax.errors import UserError

    config = SamViTConfig(family="sam_vit", width=48, depth=3, num_heads=3, pos_grid=(6, 6), mlp_hidden=96,
                          out_chans=16, window_size=4, global_attn_indexes=(1,))
    plain_model = models.build_backbone(config)
    x = jnp.asarray(_images(2, 96, 96).transpose(0, 2, 3, 1))
    variables = plain_model.init(jax.random.PRNGKey(0), x)
    variables = jax.tree_util.tree_map(lambda v: v + 0.05 * jax.random.normal(jax.random.PRNGKey(1), v.shape),
                                       variables)
    remat, _ = models.family("sam_vit").execution(config, None, True, False)

    def loss(model):
        def of(v):
            out = model.apply(v, x)
            return (out["image_embeddings"] ** 2).mean() + out["pooled"].sum()
        return of

    with jax.default_matmul_precision("float32"):
        plain_out, plain_grads = jax.value_and_grad(loss(plain_model))(variables)
        remat_out, remat_grads = jax.value_and_grad(loss(models.build_backbone(remat)))(variables)
    assert remat.remat and not config.remat
    assert abs(float(remat_out - plain_out)) <= 1e-6 * abs(float(plain_out))
    worst = max(max_abs(a, b) for a, b in zip(jax.tree_util.tree_leaves(plain_grads),
                                               jax.tree_util.tree_leaves(remat_grads)))
    assert worst < 1e-5 and max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(plain_grads)) > 1e-3
    with pytest.raises(UserError, match="model.scan"):
        models.family("sam_vit").execution(config, None, False, True)


# ------------------------------------------------------------------------------------------------ the trainer


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory):
    return testing.convert_fixture(tmp_path_factory.mktemp("sam") / "jx", "sam_vit", "checkpoint.pth")


@pytest.mark.parametrize("head,freeze", [
    ("linear", "frozen"), pytest.param("attention", "partial", marks=pytest.mark.slow), ("linear", "full")])
def test_trains_in_the_engine(sam_dir, head, freeze):
    """The converted SAM encoder in the trainer's one build path (medjax.engine.build): grayscale data (the stem
    reduced to one channel), both heads, frozen / partial (from block 1) / full; two steps update exactly the
    trainable parameters."""
    from medjax import engine
    from medjax.schema import make

    cfg = make({"model.family": "sam_vit", "model.pretrained": sam_dir, "model.head": head, "model.freeze": freeze,
                "model.unfreeze_from_block": 1, "image_size": 64, "compute_dtype": "float32", "optim.lr": 1e-2,
                "batch_size": 4, "model.attention_head.width": 16, "model.attention_head.depth": 1,
                "model.attention_head.num_heads": 2, "model.attention_head.grid": 4})
    eng = engine.build(cfg, num_classes=3, channels=1, task="multiclass", total_steps=4)
    before, changed = testing.train_two_steps(eng, 64)
    assert before["backbone/patch_embed/kernel"].shape == (16, 16, 1, 48)
    trained = {"frozen": (), "partial": ("blocks_1",), "full": ("patch_embed", "pos_embed", "blocks_0", "blocks_1")}
    for part in ("patch_embed", "pos_embed", "blocks_0", "blocks_1"):
        moved = {k for k in changed if k.startswith(f"backbone/{part}")}
        assert bool(moved) == (part in trained[freeze]), (part, sorted(moved)[:3])
    assert any(not k.startswith("backbone/") for k in changed)  # the head trains


# ------------------------------------------------------------------------------------------------ full width


@pytest.mark.slow
def test_full_width_vit_l_at_1024(tmp_path):
    """SAM ViT-L's block geometry at its native 1024 px (width 1024, 16 heads, 64x64 tokens, window 14 padded to
    70x70, a global block with 127-long tables, neck 256), two blocks deep to keep CI short, against transformers'
    SamVisionModel with perturbed weights (1e-4)."""
    torch.manual_seed(0)
    config = transformers.SamVisionConfig(hidden_size=1024, num_hidden_layers=2, num_attention_heads=16,
                                          global_attn_indexes=[1], mlp_dim=4096)
    model = perturb_(transformers.SamVisionModel(config), seed=1).eval()
    images = _images(1, 1024, 1024, seed=3)
    captured = {}
    model.vision_encoder.layers[-1].register_forward_hook(lambda m, i, o: captured.update(trunk=o))
    with torch.no_grad():
        neck = model(pixel_values=torch.from_numpy(images)).last_hidden_state.numpy()
    trunk = captured["trunk"][0] if isinstance(captured["trunk"], tuple) else captured["trunk"]
    model.save_pretrained(tmp_path / "hf")
    del model
    convert(str(tmp_path / "hf"), str(tmp_path / "jx"), "sam_vit")
    config, variables, _ = models.load_pretrained(str(tmp_path / "jx"))
    with jax.default_matmul_precision("float32"):
        out = jax.jit(models.build_backbone(config).apply)(variables, jnp.asarray(images.transpose(0, 2, 3, 1)))
    assert max_abs(out["trunk_tokens"], trunk.numpy()) <= 1e-4
    assert max_abs(out["pooled"], trunk.numpy().mean(axis=(1, 2))) <= 1e-4
    assert max_abs(out["image_embeddings"], neck) <= 1e-4
