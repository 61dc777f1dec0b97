"""SAM 2.1 image encoder (Hiera trunk + FPN neck, family sam2_hiera): parity with the official fixture through the two
CLIs and with transformers' Sam2VisionModel (perturbed random weights, padded / unpadded / non-square inputs), the
full-size parameter counts, which input sizes upstream accepts, and bad inputs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from medjax import models, pretrained
from medjax.convert import CheckpointError, ConversionError, convert
from medjax.models import VARIANTS
from medjax.models.hiera import block_plan, input_size_problem
from medjax.models.hiera import convert as hiera
from medjax.testing import PARITY_TOL, conversion_error, fixture_path, max_abs, perturb_, run_cli, without_keys

transformers = pytest.importorskip("transformers")

CKPT, CFG = fixture_path("sam2_hiera", "checkpoint.pt"), fixture_path("sam2_hiera", "config.json")
TRUNK_STAGES = [f"trunk_stage{s}" for s in range(1, 5)]


def _padded_blocks(config, height, width):
    """Blocks whose window does not tile their (patch-stride-4) input map, i.e. where upstream zero-pads."""
    hw, padded = (height // 4, width // 4), []
    for i, b in enumerate(block_plan(config)):
        if b.window and (hw[0] % b.window or hw[1] % b.window):
            padded.append(i)
        if b.q_pool:
            hw = (hw[0] // config.q_stride, hw[1] // config.q_stride)
    return padded


# ------------------------------------------------------------------------------------------------ (a) fixture


def test_fixture_parity_through_clis(tmp_path):
    out_dir, out_npz = tmp_path / "params", tmp_path / "out.npz"
    proc = run_cli("converters", CKPT, str(out_dir), "--model", "sam2_hiera", "--config", CFG)
    assert json.loads(proc.stdout) == {"output_dir": str(out_dir), "family": "sam2_hiera", "format": "sam2_official",
                                       "num_params": 565_136}
    meta = json.load(open(out_dir / pretrained.METADATA_FILE))
    assert meta["source"]["ignored_keys_outside_prefix"] == 22  # the dummy non-encoder SAM2Base keys
    run_cli("medjax.embed", "--params", str(out_dir), "--images", fixture_path("sam2_hiera", "images.npy"),
            "--output", str(out_npz))
    got, expected = np.load(out_npz), np.load(fixture_path("sam2_hiera", "expected.npz"))
    assert sorted(expected.files) == sorted(["vision_features", *TRUNK_STAGES])
    for key in expected.files:
        assert max_abs(got[key], expected[key]) <= PARITY_TOL, key
    vision = expected["vision_features"]  # (2, 32, 6, 6)
    assert max_abs(got["linear_head_input"], vision.mean(axis=(2, 3))) <= PARITY_TOL
    assert max_abs(got["attention_head_input"], vision.reshape(2, 32, 36).transpose(0, 2, 1)) <= PARITY_TOL
    config = models.config_from_dict("sam2_hiera", meta["architecture"])
    assert _padded_blocks(config, 96, 96) == [4, 6, 7]  # the README's block plan: stages 3 and 4 pad


# ------------------------------------------------------------------------------------------------ (b) transformers

TINY = dict(hidden_size=16, blocks_per_stage=[1, 2, 3, 2], embed_dim_per_stage=[16, 32, 64, 128],
            num_attention_heads_per_stage=[1, 2, 4, 8], window_size_per_stage=[8, 4, 4, 2], global_attention_blocks=[5],
            window_positional_embedding_background_size=[4, 4])
# odd last-stage window (like B+'s 7), a global block inside stage 2, a non-square background grid, mlp_ratio 2
ODD = dict(hidden_size=24, blocks_per_stage=[1, 2, 2, 2], embed_dim_per_stage=[24, 48, 96, 192],
           num_attention_heads_per_stage=[2, 2, 4, 4], window_size_per_stage=[8, 4, 6, 3], global_attention_blocks=[2],
           window_positional_embedding_background_size=[3, 5], mlp_ratio=2.0)


def _vision_config(backbone: dict, fpn: int):
    dims = backbone["embed_dim_per_stage"]
    return transformers.Sam2VisionConfig(backbone_config=transformers.Sam2HieraDetConfig(**backbone),
                                         backbone_channel_list=dims[::-1], fpn_hidden_size=fpn)


def _perturbed(model, seed):
    perturb_(model, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # the pos-embeds start at zero; make the resize and the tiling matter
        for t in (model.backbone.pos_embed, model.backbone.pos_embed_window):
            t.add_(torch.randn(t.shape, generator=gen) * 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (torch model, converted params dir), converted from save_pretrained output (config.json beside it)."""
    out = {}
    for seed, (name, backbone, fpn) in enumerate([("tiny", TINY, 32), ("odd", ODD, 16)]):
        torch.manual_seed(seed)
        model = _perturbed(transformers.Sam2VisionModel(_vision_config(backbone, fpn)), seed=10 + seed)
        root = tmp_path_factory.mktemp(name)
        model.save_pretrained(root / "hf")
        meta = convert(str(root / "hf"), str(root / "jx"), "sam2_hiera")
        assert meta["source"]["format"] == "sam2_transformers_vision"
        assert meta["num_params"] == sum(p.numel() for p in model.parameters())
        out[name] = (model, str(root / "jx"))
    return out


def _medjax(params_dir, images):
    config, params_vars, _ = models.load_pretrained(params_dir)
    params = params_vars["params"]
    apply = jax.jit(models.build_backbone(config).apply)
    with jax.default_matmul_precision("float32"):
        out = apply({"params": params}, jnp.asarray(images.transpose(0, 2, 3, 1)))
    return config, {k: np.asarray(v) for k, v in out.items()}


def _reference(model, images):
    x = torch.from_numpy(images)
    with torch.no_grad():
        fpn = model(x).fpn_hidden_states  # fine to coarse; scalp 1 (num_feature_levels 3): the last is stride 16
        trunk = model.backbone(x).intermediate_hidden_states  # NHWC
    vision = fpn[-1].numpy()
    b, c = vision.shape[:2]
    return {"vision_features": vision, "backbone_fpn_0": fpn[0].numpy(), "backbone_fpn_1": fpn[1].numpy(),
            **{name: t.permute(0, 3, 1, 2).numpy() for name, t in zip(TRUNK_STAGES, trunk)},
            "linear_head_input": vision.mean(axis=(2, 3)),
            "attention_head_input": vision.reshape(b, c, -1).transpose(0, 2, 1)}


CASES = {  # name: (model, H, W, blocks that zero-pad their windows)
    "pads_stages_3_4": ("tiny", 96, 96, [4, 6, 7]),
    "no_padding": ("tiny", 64, 64, []),
    "non_square_odd_window": ("odd", 128, 96, [4, 5, 6]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_parity(hf_models, case):
    name, h, w, padded = CASES[case]
    model, params_dir = hf_models[name]
    images = np.random.default_rng(h * w).standard_normal((2, 3, h, w)).astype(np.float32)
    config, got = _medjax(params_dir, images)
    assert _padded_blocks(config, h, w) == padded
    ref = _reference(model, images)
    assert sorted(got) == sorted(ref)
    diffs = {k: max_abs(got[k], v) for k, v in ref.items()}
    assert max(diffs.values()) <= PARITY_TOL, diffs
    assert got["vision_features"].shape == (2, config.d_model, h // 16, w // 16)


def test_transformers_sam2model_file(hf_models, tmp_path):
    """A Sam2Model folder (vision tower under `vision_encoder.`, config.json with model_type 'sam2') converts to the
    same parameters as the Sam2VisionModel it holds; its prompt encoder and mask decoder are skipped."""
    vision, params_dir = hf_models["tiny"]
    config = transformers.Sam2Config(vision_config=vision.config.to_dict(),
                                     prompt_encoder_config=dict(hidden_size=32),
                                     mask_decoder_config=dict(hidden_size=32, mlp_dim=64, iou_head_hidden_dim=32))
    sam = transformers.Sam2Model(config)
    sam.vision_encoder.load_state_dict(vision.state_dict())
    sam.save_pretrained(tmp_path / "sam2")
    meta = convert(str(tmp_path / "sam2"), str(tmp_path / "jx"), "sam2_hiera")
    assert meta["source"]["format"] == "sam2_transformers" and meta["source"]["ignored_keys_outside_prefix"] > 0
    ours = pretrained.flatten(models.load_pretrained(str(tmp_path / "jx"))[1]["params"])
    reference = pretrained.flatten(models.load_pretrained(params_dir)[1]["params"])
    assert ours.keys() == reference.keys()
    assert all(np.array_equal(ours[k], reference[k]) for k in ours)


# ------------------------------------------------------------------------------------------------ (c) full size

FULL = {  # variant: (transformers Sam2HieraDetConfig kwargs, parameters)
    "sam2.1_hiera_b+": (dict(hidden_size=112, blocks_per_stage=[2, 3, 16, 3], global_attention_blocks=[12, 16, 20],
                             window_size_per_stage=[8, 4, 14, 7], window_positional_embedding_background_size=[14, 14],
                             embed_dim_per_stage=[112, 224, 448, 896]), 69_106_816),
    "sam2.1_hiera_l": (dict(hidden_size=144, blocks_per_stage=[2, 6, 36, 4], global_attention_blocks=[23, 33, 43],
                            window_size_per_stage=[8, 4, 16, 8], window_positional_embedding_background_size=[7, 7],
                            embed_dim_per_stage=[144, 288, 576, 1152]), 212_703_280),
}


@pytest.fixture(scope="module")
def meta_models():
    out = {}
    for name, (kwargs, _) in FULL.items():
        with torch.device("meta"):
            out[name] = transformers.Sam2VisionModel(_vision_config(
                dict(kwargs, num_attention_heads=2, num_attention_heads_per_stage=[2, 4, 8, 16]), 256)).eval()
    return out


@pytest.mark.parametrize("name", list(FULL))
def test_full_size_parameter_counts(meta_models, name):
    family, kwargs = VARIANTS[name]
    config = hiera.parse_config(kwargs)
    assert family == "sam2_hiera" and config.d_model == 256 and config.fpn_top_down_levels == (2, 3)
    assert config.scalp == 1 and config.channel_list == tuple(FULL[name][0]["embed_dim_per_stage"][::-1])
    ours = models.count_params(models.param_shapes(config))
    assert ours == sum(p.numel() for p in meta_models[name].parameters()) == FULL[name][1]
    # the same architecture read from the transformers config.json
    assert hiera.parse_config(meta_models[name].config.to_dict()) == config


@pytest.mark.parametrize("name", list(FULL))
def test_full_size_accepted_input_sizes(meta_models, name):
    """Every multiple of 32 px fits (so do 32k-3 .. 32k-1: the k7 s4 p3 patch conv rounds up); other sizes make
    upstream fail in the window pos-embed tiling, and medjax refuses them up front. Upstream's behaviour is read off
    transformers' port run on the meta device (shapes only)."""
    config = hiera.parse_config(VARIANTS[name][1])
    assert config.image_size == (224, 224)
    assert all(input_size_problem(config, 32 * i, 32 * j) is None for i in range(1, 33) for j in (i, 7, 32))
    for h, w in [(224, 224), (224, 288), (221, 224), (240, 224), (224, 1000), (1024, 1024), (96, 64)]:
        try:
            with torch.no_grad():
                upstream_ok = meta_models[name](torch.empty(1, 3, h, w, device="meta")).fpn_hidden_states is not None
        except RuntimeError:
            upstream_ok = False
        assert upstream_ok == (input_size_problem(config, h, w) is None), (h, w, input_size_problem(config, h, w))
    model = models.build_backbone(config)
    out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0],
                         jax.ShapeDtypeStruct((1, 224, 288, 3), jnp.float32))
    assert out["vision_features"].shape == (1, 256, 14, 18) and out["attention_head_input"].shape == (1, 252, 256)
    with pytest.raises(ValueError, match="240x224 px does not fit.*not a multiple of the 8x8 window pos-embed"):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x), jax.ShapeDtypeStruct((1, 240, 224, 3), jnp.float32))


@pytest.mark.parametrize("windows,global_blocks,q_pool,top_down", [
    ([2, 2, 2, 2], [5], 3, [2, 3]), ([4, 5, 7, 3], [4], 3, [2, 3]), ([4, 4, 4, 4], [], 2, [])])
def test_tiny_accepted_input_sizes_match_transformers(windows, global_blocks, q_pool, top_down):
    """medjax accepts exactly the sizes at which upstream runs and keeps the batch (where the q-pooled windows do
    not re-split into as many windows, upstream crashes or silently mixes the batch up)."""
    backbone = dict(TINY, window_size_per_stage=windows, global_attention_blocks=global_blocks,
                    num_query_pool_stages=q_pool)
    config = _vision_config(backbone, 8)
    config.fpn_top_down_levels = top_down
    model = transformers.Sam2VisionModel(config).eval()
    ours = hiera.parse_config(model.config.to_dict())
    for h in (16, 29, 32, 40, 48, 61, 64, 80, 96, 100, 128):
        for w in (h, 64):
            try:
                with torch.no_grad():
                    upstream_ok = all(f.shape[0] == 1 for f in model(torch.zeros(1, 3, h, w)).fpn_hidden_states)
            except (RuntimeError, ZeroDivisionError):
                upstream_ok = False
            assert upstream_ok == (input_size_problem(ours, h, w) is None), (h, w, input_size_problem(ours, h, w))


# ------------------------------------------------------------------------------------------------ (d) bad inputs


@pytest.mark.parametrize("family", ["dinov2", "aimv2"])
def test_sam2_checkpoint_as_another_family(tmp_path, family):
    if family not in models.FAMILIES:
        pytest.skip(f"no {family} family registered")
    with pytest.raises(CheckpointError, match=f"not a {family} checkpoint.*looks like a sam2_hiera checkpoint"):
        convert(CKPT, str(tmp_path / "out"), family, fixture_path(family, "config.json"))
    with pytest.raises(CheckpointError, match="not a sam2_hiera checkpoint.*looks like a dinov2 checkpoint"):
        convert(fixture_path("dinov2", "checkpoint.pth"), str(tmp_path / "out"), "sam2_hiera", CFG)
    assert not (tmp_path / "out").exists()


def test_truncated_checkpoint(tmp_path):
    data = open(CKPT, "rb").read()
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        convert(str(path), str(tmp_path / "out"), "sam2_hiera", CFG)
    assert str(path) in str(info.value)


def test_missing_keys_and_wrong_variant(tmp_path):
    bad = without_keys(CKPT, tmp_path / "bad.pt", "model/image_encoder.trunk.blocks.3.proj.weight")
    error = conversion_error(bad, str(tmp_path / "out"), "sam2_hiera", CFG)
    assert error.missing == ["trunk.blocks.3.proj.weight (for blocks_3/proj/kernel)"]
    with pytest.raises(ConversionError, match=r"trunk.pos_embed.*gives \(1, 4, 4, 16\).*expects \(1, 14, 14, 112\)"):
        convert(CKPT, str(tmp_path / "out"), "sam2.1_hiera_b+")


def test_bad_configs(tmp_path):
    base = json.load(open(CFG))

    def convert_with(cfg):
        (tmp_path / "cfg.json").write_text(json.dumps(cfg))
        convert(CKPT, str(tmp_path / "out"), "sam2_hiera", str(tmp_path / "cfg.json"))

    with pytest.raises(CheckpointError, match=r"trunk: Hiera\): unsupported constructor arguments \['windows_spec'\]"):
        convert_with(base | {"trunk": base["trunk"] | {"windows_spec": [8, 4, 4, 2]}})
    with pytest.raises(CheckpointError, match=r"ImageEncoder\): unsupported constructor arguments \['scalpel'\]"):
        convert_with(base | {"scalpel": 1})
    with pytest.raises(CheckpointError, match="fpn_interp_model='bilinear' is not supported"):
        convert_with(base | {"neck": base["neck"] | {"fpn_interp_model": "bilinear"}})
    with pytest.raises(CheckpointError, match=r"channel_list \[16, 32, 64, 128\] must be .* \[128, 64, 32, 16\]"):
        convert_with(base | {"neck": base["neck"] | {"backbone_channel_list": [16, 32, 64, 128]}})
    with pytest.raises(CheckpointError, match="block 1 pools q with stride 2 but has global attention"):
        convert_with(base | {"trunk": base["trunk"] | {"global_att_blocks": [1]}})
    with pytest.raises(CheckpointError, match="Sam2HieraDetConfig \\(the trunk alone\\)"):
        hiera.parse_config({"model_type": "sam2_hiera_det_model"})
    with pytest.raises(CheckpointError, match=r"unsupported keys \['fpn_hiden_size'\]"):
        hiera.parse_config({"model_type": "sam2_vision_model", "fpn_hiden_size": 256})
    # the yaml's model.image_encoder subtree, `_target_` keys and all, is read as is
    yaml_like = {"model": {"_target_": "sam2.modeling.sam2_base.SAM2Base", "image_encoder": {
        "_target_": "sam2.modeling.backbones.image_encoder.ImageEncoder", "scalp": 1,
        "trunk": base["trunk"] | {"_target_": "sam2.modeling.backbones.hieradet.Hiera"}, "neck": base["neck"]}}}
    assert hiera.parse_config(yaml_like) == hiera.parse_config(base)
