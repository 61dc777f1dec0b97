"""torchvision CNNs (ResNet, DenseNet, VGG): fixture parity through the CLIs (both DenseNet namings), a plain-PyTorch
reference checked against the fixtures and then used at full size, BatchNorm train mode and frozen statistics against
torch, the pooling semantics, parameter counts of every torchvision variant, the family facts and loud failures."""

import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from medjax import embed, models, pretrained
from medjax.convert import CheckpointError, ConversionError, convert
from medjax.models import cnn
from medjax.models.densenet import make_fixture as densenet_fixture
from medjax.models.layers import frozen_norms
from medjax.models.resnet import Bottleneck
from medjax.models.resnet.tests.torchvision_reference import VGG, DenseNet, legacy_densenet_keys, resnet
from medjax.testing import PARITY_TOL, convert_and_embed, fixture_path, max_abs, perturb_, run_cli

FULL_SIZE_TOL = 1e-4
# train-mode BatchNorm: 1e-6 of the output's scale (a bottleneck's outputs reach ~6; torch float32 itself is 1.3e-6
# from float64 there); running statistics 1e-6 absolute
BN_TOL = 1e-6

# (fixture folder, checkpoint inside it, config inside it)
FIXTURES = {
    "resnet": ("resnet", "checkpoint.pth", "config.json"),
    "densenet_legacy": ("densenet", "checkpoint.pth", "config.json"),
    "densenet_state_dict": ("densenet", "state_dict/checkpoint.pth", "state_dict/config.json"),
    "vgg": ("vgg", "checkpoint.pth", "config.json"),
}

# torchvision's `num_params` of each model's IMAGENET1K weights: every parameter, the ImageNet classifier included
UPSTREAM_PARAMS = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "resnet101": 44_549_160,
    "resnet152": 60_192_808, "resnext50_32x4d": 25_028_904, "resnext101_32x8d": 88_791_336,
    "resnext101_64x4d": 83_455_272, "wide_resnet50_2": 68_883_240, "wide_resnet101_2": 126_886_696,
    "densenet121": 7_978_856, "densenet161": 28_681_000, "densenet169": 14_149_480, "densenet201": 20_013_928,
    "vgg11": 132_863_336, "vgg11_bn": 132_868_840, "vgg13": 133_047_848, "vgg13_bn": 133_053_736,
    "vgg16": 138_357_544, "vgg16_bn": 138_365_992, "vgg19": 143_667_240, "vgg19_bn": 143_678_248,
}


def _fixture_config(name):
    folder, _, config = FIXTURES[name]
    with open(fixture_path(folder, config)) as f:
        return json.load(f)


def _reference_from_fixture(name):
    """The plain-torch reference built from a fixture's config.json, holding its checkpoint (strict)."""
    folder, ckpt, _ = FIXTURES[name]
    cfg = _fixture_config(name)
    if folder == "resnet":
        model = resnet(cfg["block"], cfg["layers"], num_classes=cfg["num_classes"], groups=cfg["groups"],
                       width_per_group=cfg["width_per_group"])
    elif folder == "densenet":
        model = DenseNet(cfg["growth_rate"], cfg["block_config"], cfg["num_init_features"], cfg["bn_size"],
                         cfg["num_classes"])
    else:
        model = VGG(cfg["cfg"], cfg["batch_norm"], cfg["num_classes"], cfg["dropout"], cfg["classifier_hidden"])
    state = torch.load(fixture_path(folder, "state_dict/checkpoint.pth" if folder == "densenet" else ckpt))
    model.load_state_dict(state, strict=True)
    return model.eval()


def _nhwc_tokens(fmap_nchw):
    b, c, h, w = fmap_nchw.shape
    return np.asarray(fmap_nchw).transpose(0, 2, 3, 1).reshape(b, h * w, c)


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_parity_through_clis(name, tmp_path):
    folder, ckpt, config = FIXTURES[name]
    got, expected, stdout = convert_and_embed(tmp_path, folder, ckpt, folder, fixture_path(folder, config))
    meta = json.loads(stdout)
    assert meta["format"] == {"densenet_legacy": "torchvision_legacy"}.get(name, "torchvision")
    required = [k for k in expected.files if not k.startswith("debug_")]
    assert required == ["features", "logits"]
    for key in required:
        diff = max_abs(got[key], expected[key])
        assert diff <= PARITY_TOL, f"{name}/{key}: max abs diff {diff:.3g}"
    assert max_abs(got["linear_head_input"], got["features"]) == 0
    tokens = got["attention_head_input"]
    if folder == "resnet":  # layer4's 2x2 map as 4 tokens
        assert max_abs(tokens, _nhwc_tokens(expected["debug_layer4"])) <= PARITY_TOL
    elif folder == "densenet":  # relu(norm5(...)), whose mean is the feature
        assert max_abs(tokens, _nhwc_tokens(np.maximum(expected["debug_features_prerelu"], 0))) <= PARITY_TOL
    else:  # the last max-pool's 2x2 map of 32 channels, before the adaptive pool
        with torch.no_grad():
            fmap = _reference_from_fixture(name).features(torch.from_numpy(np.load(fixture_path(folder, "images.npy"))))
        assert tokens.shape == (2, 4, 32) and max_abs(tokens, _nhwc_tokens(fmap.numpy())) <= PARITY_TOL
    if folder != "vgg":
        assert max_abs(tokens.mean(axis=1), got["features"]) <= 1e-6


@pytest.mark.parametrize("name", ["resnet", "densenet_legacy", "vgg"])
def test_plain_torch_reference_reproduces_the_fixtures(name):
    """The references below stand in for torchvision; they must give torchvision's numbers on its own files."""
    folder = FIXTURES[name][0]
    model = _reference_from_fixture(name)
    expected = np.load(fixture_path(folder, "expected.npz"))
    with torch.no_grad():
        out = model(torch.from_numpy(np.load(fixture_path(folder, "images.npy"))))
    for key in ("features", "logits"):
        assert max_abs(out[key].numpy(), expected[key]) <= 1e-6, key
    legacy = legacy_densenet_keys(torch.load(fixture_path("densenet", "state_dict/checkpoint.pth")))
    official = torch.load(fixture_path("densenet", "checkpoint.pth"))
    assert sorted(legacy) == sorted(official) and all(torch.equal(legacy[k], official[k]) for k in official)



def test_densenet_fixture_script_writes_the_official_naming():
    """medjax/models/densenet/make_fixture.py's renaming of `model.state_dict()` (state_dict/checkpoint.pth, as
    torchvision wrote it) gives the official files' naming of checkpoint.pth: the same keys in the same order."""
    legacy = densenet_fixture.legacy(torch.load(fixture_path("densenet", "state_dict/checkpoint.pth")))
    official = torch.load(fixture_path("densenet", "checkpoint.pth"))
    assert list(legacy) == list(official) and all(torch.equal(legacy[k], official[k]) for k in official)

# ------------------------------------------------------------------------------------------------ full size

def _reference(family, kw, seed):
    """A randomly initialised, perturbed (BatchNorm statistics too) plain-torch reference from constructor kwargs."""
    torch.manual_seed(seed)
    classes = kw.get("num_classes", 1000)
    if family == "resnet":
        model = resnet(kw["block"], kw["layers"], num_classes=classes, groups=kw.get("groups", 1),
                       width_per_group=kw.get("width_per_group", 64),
                       replace_stride_with_dilation=kw.get("replace_stride_with_dilation") or (False,) * 3)
    elif family == "densenet":
        model = DenseNet(kw["growth_rate"], kw["block_config"], kw["num_init_features"], kw.get("bn_size", 4),
                         classes)
    else:
        model = VGG(kw["cfg"], kw["batch_norm"], classes, classifier_hidden=kw.get("classifier_hidden", 4096))
    return perturb_(model.eval(), seed + 1)


def _full_size(variant, image_size, batch, tmp_path, seed):
    """(medjax outputs, torch outputs, torch parameter count, converter metadata) for a randomly initialised,
    perturbed torch reference of `variant` saved as a plain state dict and converted by the converter."""
    family, kwargs = models.VARIANTS[variant]
    model = _reference(family, kwargs, seed)
    n_torch = sum(p.numel() for p in model.parameters())
    state = model.state_dict()
    torch.save(legacy_densenet_keys(state) if family == "densenet" else state, tmp_path / "weights.pth")
    meta = convert(str(tmp_path / "weights.pth"), str(tmp_path / "params"), variant)
    images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        ref = {k: v.numpy() for k, v in model(images).items()}
    del model, state
    got = embed.embed(str(tmp_path / "params"), images.numpy())
    return got, ref, n_torch, meta


@pytest.mark.slow
@pytest.mark.parametrize("variant,image_size", [("resnet50", 224), ("densenet121", 224), ("vgg16_bn", 128)])
def test_full_size_parity_against_plain_torch(variant, image_size, tmp_path):
    """Randomly initialised, perturbed (BatchNorm statistics too) upstream-size models: the converter's output
    matches the plain-torch reference. DenseNet goes through the official files' legacy naming; VGG-16-BN at 128 px
    (a 4x4 map) exercises the adaptive pool's overlapping windows and the BatchNorm key table."""
    got, ref, n_torch, meta = _full_size(variant, image_size, 2, tmp_path, seed=len(variant))
    assert n_torch == meta["num_params"] == UPSTREAM_PARAMS[variant]
    for key in ("features", "logits"):
        scale = max(1.0, float(np.abs(ref[key]).max()))
        diff = max_abs(got[key], ref[key])
        print(f"{variant}@{image_size}/{key}: max abs diff {diff:.3g} (max abs {np.abs(ref[key]).max():.3g})")
        assert diff <= FULL_SIZE_TOL * scale, f"{variant}/{key}: max abs diff {diff:.3g}"
    assert max_abs(got["attention_head_input"], _nhwc_tokens(ref["feature_map"])) <= FULL_SIZE_TOL * max(
        1.0, float(np.abs(ref["feature_map"]).max()))


STRUCTURES = {  # the structural options the fixtures do not cover, at sizes where floors and odd maps matter
    "resnet_basic": ("resnet", {"block": "BasicBlock", "layers": [1, 2, 1, 1], "num_classes": 5}, 40),
    "resnext_dilated": ("resnet", {"block": "Bottleneck", "layers": [1, 1, 2, 1], "groups": 4, "width_per_group": 8,
                                   "replace_stride_with_dilation": [False, True, True], "num_classes": 5}, 33),
    "densenet_odd": ("densenet", {"growth_rate": 4, "block_config": [1, 2, 3], "num_init_features": 8, "bn_size": 2,
                                  "num_classes": 5}, 37),
    "vgg_bn": ("vgg", {"cfg": [8, "M", 8, 16, "M", 16, "M"], "batch_norm": True, "classifier_hidden": 16,
                       "num_classes": 5}, 50),
}


@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_structural_options_match_plain_torch(name, tmp_path):
    """BasicBlock, ResNeXt groups with dilated stages, DenseNet with odd maps (transition floors), VGG with
    BatchNorm and a 6x6 -> 7x7 adaptive pool: converted from --config and run, against the plain-torch reference."""
    family, kw, size = STRUCTURES[name]
    model = _reference(family, kw, seed=sum(map(ord, name)))
    torch.save(model.state_dict(), tmp_path / "w.pth")
    (tmp_path / "config.json").write_text(json.dumps({**kw, "family": family}))
    convert(str(tmp_path / "w.pth"), str(tmp_path / "p"), family, str(tmp_path / "config.json"))
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(images)
    got = embed.embed(str(tmp_path / "p"), images.numpy())
    for key in ("features", "logits"):
        assert max_abs(got[key], ref[key].numpy()) <= PARITY_TOL, key
    assert max_abs(got["attention_head_input"], _nhwc_tokens(ref["feature_map"])) <= PARITY_TOL


@pytest.mark.slow
def test_parameter_counts_of_every_torchvision_variant():
    """Every parameter of the torchvision module, the ImageNet classifier (fc / classifier / classifier[6]) included,
    as torchvision's weight metadata counts them (BatchNorm running statistics are buffers, not parameters)."""
    for variant, expected in UPSTREAM_PARAMS.items():
        family, kwargs = models.VARIANTS[variant]
        config = models.FAMILIES[family].converter.parse_config(kwargs)
        assert models.count_params(models.param_shapes(config)) == expected, variant
    names = {v for v, (f, _) in models.VARIANTS.items() if f in ("resnet", "densenet", "vgg")}
    assert names == set(UPSTREAM_PARAMS)


# ------------------------------------------------------------------------------------------------ BatchNorm train mode

def _torch_bottleneck():
    torch.manual_seed(0)
    downsample = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 1, 2, bias=False), torch.nn.BatchNorm2d(32))
    from medjax.models.resnet.tests.torchvision_reference import Bottleneck as TorchBottleneck

    block = TorchBottleneck(16, 8, stride=2, downsample=downsample)
    return perturb_(block, 1)


def _block_variables(block):
    """torch Bottleneck state -> the Flax block's variables, through the converter's ResNet key table."""
    from medjax.conversion import apply_rules
    from medjax.models.resnet.convert import IGNORE, RULES

    state = {f"layer1.0.{k}": v.detach().numpy().copy() for k, v in block.state_dict().items()}
    flax_block = Bottleneck(8, stride=2, downsample=True)
    shapes = jax.eval_shape(lambda x: flax_block.init(jax.random.key(0), x), jnp.zeros((1, 8, 8, 16)))
    expected = {f"{'' if c == 'params' else c + ':'}layer1_0/{k}": v.shape
                for c, tree in shapes.items() for k, v in pretrained.flatten(dict(tree)).items()}
    variables = apply_rules(state, RULES, IGNORE, expected, "block", "resnet")
    return flax_block, jax.tree_util.tree_map(jnp.asarray, {c: t["layer1_0"] for c, t in variables.items()})


def test_bottleneck_train_mode_matches_torch_outputs_and_running_stats(matmul_f32):
    block = _torch_bottleneck().train()
    flax_block, variables = _block_variables(block)
    x = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    ref = block(x).detach().numpy()
    out, updates = flax_block.apply(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), train=True,
                                    mutable=["batch_stats"])
    assert max_abs(np.asarray(out).transpose(0, 3, 1, 2), ref) <= BN_TOL * max(1.0, float(np.abs(ref).max()))
    stats = pretrained.flatten(flax.core.unfreeze(updates["batch_stats"]))
    torch_names = {"downsample_bn": "downsample.1"}
    for path, value in stats.items():
        module, stat = path.rsplit("/", 1)
        key = f"{torch_names.get(module, module)}.running_{stat}"
        assert max_abs(value, block.state_dict()[key].numpy()) <= BN_TOL, key
        assert max_abs(value, pretrained.flatten(variables["batch_stats"])[path]) > 1e-4, f"{path} not updated"


def test_frozen_norm_keeps_its_statistics_bitwise(matmul_f32):
    """A BatchNorm listed in `frozen_norms` normalises with its stored statistics and leaves them bitwise unchanged
    while the others train; torch's equivalent is that BatchNorm in eval mode inside a training block."""
    block = _torch_bottleneck().train()
    block.bn2.eval()
    flax_block, variables = _block_variables(block)
    x = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = block(x).detach().numpy()
    with frozen_norms(["bn2"]):
        out, updates = jax.jit(lambda v, x: flax_block.apply(v, x, train=True, mutable=["batch_stats"]))(
            variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
    assert max_abs(np.asarray(out).transpose(0, 3, 1, 2), ref) <= BN_TOL * max(1.0, float(np.abs(ref).max()))
    before, after = variables["batch_stats"], updates["batch_stats"]
    for stat in ("mean", "var"):
        np.testing.assert_array_equal(np.asarray(after["bn2"][stat]), np.asarray(before["bn2"][stat]))
        assert max_abs(after["bn1"][stat], before["bn1"][stat]) > 1e-4  # the others still train
    assert max_abs(after["bn1"]["mean"], block.bn1.running_mean.numpy()) <= BN_TOL


@pytest.mark.parametrize("name", ["resnet", "densenet_legacy", "vgg"])
def test_whole_model_train_mode_matches_torch(name, tmp_path, matmul_f32):
    """Each family's fixture model in train mode (batch statistics, running-stat updates; VGG's dropout off by
    rate 0 here): outputs and every updated statistic match torch's train mode."""
    folder, ckpt, config = FIXTURES[name]
    model = _reference_from_fixture(name)
    _fixture_config(name)
    if folder == "vgg":  # the fixture VGG has no BatchNorm: train mode differs only by dropout
        model.classifier[2].p = model.classifier[5].p = 0.0
    convert(fixture_path(folder, ckpt), str(tmp_path / "p"), folder, fixture_path(folder, config))
    mj_config, variables, _ = models.load_pretrained(str(tmp_path / "p"))
    if folder == "vgg":
        import dataclasses

        mj_config = dataclasses.replace(mj_config, dropout=0.0)
    x = torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(5))
    ref = model.train()(x)
    apply = jax.jit(lambda v, x: models.build_backbone(mj_config).apply(v, x, train=True, mutable=["batch_stats"]))
    out, updates = apply(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
    for key in ("features", "logits"):
        diff = max_abs(out[key], ref[key].detach().numpy())
        assert diff <= 1e-5 * max(1.0, float(ref[key].detach().abs().max())), f"{name}/{key}: {diff:.3g}"
    flat = pretrained.flatten(flax.core.unfreeze(updates.get("batch_stats", {})))
    assert bool(flat) == (folder != "vgg")
    # torch's updated statistics, renamed by the converter's key table
    torch.save(model.state_dict(), tmp_path / "trained.pth")
    convert(str(tmp_path / "trained.pth"), str(tmp_path / "t"), folder, fixture_path(folder, config))
    torch_stats = pretrained.flatten(models.load_pretrained(str(tmp_path / "t"))[1].get("batch_stats", {}))
    assert sorted(torch_stats) == sorted(flat)
    for path, value in flat.items():
        assert max_abs(value, torch_stats[path]) <= 1e-5, path


def test_vgg_dropout_draws_from_the_dropout_stream():
    config = models.config_from_dict("vgg", {"cfg": [4, "M"], "classifier_hidden": 64, "num_classes": 3})
    model = models.build_backbone(config)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    variables = model.init(jax.random.key(0), x)
    train = jax.jit(lambda key: model.apply(variables, x, train=True, rngs={"dropout": key})["features"])
    a, again, b = train(jax.random.key(1)), train(jax.random.key(1)), train(jax.random.key(2))
    np.testing.assert_array_equal(a, again)
    assert not np.array_equal(a, b) and 0.2 < float(jnp.mean(a == 0) - jnp.mean(model.apply(
        variables, x)["features"] == 0)) < 0.8  # dropout zeroes about half of the eval-mode non-zeros
    with pytest.raises(flax.errors.InvalidRngError):
        model.apply(variables, x, train=True)  # train mode needs the stream


# ------------------------------------------------------------------------------------------------ pooling

@pytest.mark.parametrize("height,width", [(1, 1), (2, 2), (3, 5), (4, 4), (6, 9), (7, 7), (13, 10)])
def test_adaptive_avg_pool_matches_torch(height, width, matmul_f32):
    x = np.random.default_rng(height * 31 + width).normal(size=(2, 3, height, width)).astype(np.float32)
    ref = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x), 7).numpy()
    got = np.asarray(cnn.adaptive_avg_pool(jnp.asarray(x.transpose(0, 2, 3, 1)), 7)).transpose(0, 3, 1, 2)
    assert max_abs(got, ref) <= 1e-6
    assert cnn.adaptive_windows(2, 7) == [(0, 1), (0, 1), (0, 1), (0, 2), (1, 2), (1, 2), (1, 2)]


@pytest.mark.parametrize("size", [7, 8, 9])
def test_pools_pad_and_floor_like_torch(size):
    x = -np.abs(np.random.default_rng(size).normal(size=(1, 2, size, size))).astype(np.float32) - 1  # all < 0
    nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
    ref = torch.nn.functional.max_pool2d(torch.from_numpy(x), 3, 2, 1).numpy()  # pads with -inf, not 0
    assert max_abs(np.asarray(cnn.max_pool(nhwc, 3, 2, 1)).transpose(0, 3, 1, 2), ref) == 0
    ref = torch.nn.functional.avg_pool2d(torch.from_numpy(x), 2, 2).numpy()  # an odd map loses its last row
    assert max_abs(np.asarray(cnn.avg_pool(nhwc, 2, 2)).transpose(0, 3, 1, 2), ref) <= 1e-6


# ------------------------------------------------------------------------------------------------ family facts

@pytest.mark.parametrize("variant", ["resnet18", "resnet50", "densenet121", "vgg16", "vgg16_bn"])
def test_family_facts_cover_every_parameter(variant):
    family_name, kwargs = models.VARIANTS[variant]
    config = models.FAMILIES[family_name].converter.parse_config(kwargs)
    family = models.family(family_name)
    flat = pretrained.flatten(models.param_shapes(config))
    patterns = family.layer_patterns(config)
    depth = {path: family.layer_of(config, path, patterns) for path in flat}
    blocks = {"resnet18": 8, "resnet50": 16, "densenet121": 58, "vgg16": 12, "vgg16_bn": 12}[variant]
    assert len(patterns) == blocks + 1
    assert set(depth.values()) == set(range(blocks + 2))  # every block holds parameters; the head comes after
    assert all(d == blocks + 1 for p, d in depth.items() if p.startswith(("fc/", "classifier", "norm5/")))
    assert flat[family.stem].shape[2] == 3 and len(flat[family.stem].shape) == 4
    gray = models.param_shapes(config.__class__.from_dict({**config.to_dict(), "in_chans": 1}))
    assert pretrained.flatten(gray)[family.stem].shape == (*flat[family.stem].shape[:2], 1,
                                                                     flat[family.stem].shape[3])


# ------------------------------------------------------------------------------------------------ loud failures

def test_config_refuses_unknown_keys_by_name():
    for family in ("resnet", "densenet", "vgg"):
        cfg = {**_fixture_config("densenet_legacy" if family == "densenet" else family), "colour_jitter": 1}
        with pytest.raises(CheckpointError, match="colour_jitter"):
            models.FAMILIES[family].converter.parse_config(cfg)
    with pytest.raises(CheckpointError, match="drop_path_rate"):  # tolerated by the ViT readers, not torchvision's
        models.FAMILIES["resnet"].converter.parse_config({**_fixture_config("resnet"), "drop_path_rate": 0.1})
    with pytest.raises(CheckpointError, match="'vgg' model"):
        models.FAMILIES["resnet"].converter.parse_config({**_fixture_config("resnet"), "family": "vgg"})
    with pytest.raises(CheckpointError, match="norm_layer"):
        models.FAMILIES["resnet"].converter.parse_config({**_fixture_config("resnet"), "norm_layer": "GroupNorm"})
    with pytest.raises(CheckpointError, match="block"):
        models.FAMILIES["resnet"].converter.parse_config({**_fixture_config("resnet"), "block": "ResBlock"})
    with pytest.raises(CheckpointError, match="cfg"):
        models.FAMILIES["vgg"].converter.parse_config({**_fixture_config("vgg"), "cfg": [8, "N"]})


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path):
    state = torch.load(fixture_path("densenet", "checkpoint.pth"))
    state.pop("features.denseblock2.denselayer1.norm.2.running_var")
    key = "features.denseblock1.denselayer1.conv.1.weight"
    state[key] = state[key][:4]
    state["features.denseblock9.extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ConversionError) as e:
        convert(str(tmp_path / "bad.pth"), str(tmp_path / "out"), "densenet",
                fixture_path("densenet", "config.json"))
    message = str(e.value)
    assert "features.denseblock2.denselayer1.norm.2.running_var" in message
    assert "shape mismatches" in message and "features.denseblock1.denselayer1.conv.1.weight" in message
    assert "features.denseblock9.extra.weight" in message


def test_vgg_batchnorm_weights_are_told_from_conv_kernels(tmp_path):
    """In a `_bn` file `features.<i>.weight` is a conv kernel or a BatchNorm weight; a file without a BatchNorm's
    running statistics is refused, naming the keys."""
    torch.manual_seed(0)
    model = perturb_(VGG([4, "M", 6, "M"], batch_norm=True, num_classes=3, classifier_hidden=8).eval(), 1)
    torch.save(model.state_dict(), tmp_path / "bn.pth")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"cfg": [4, "M", 6, "M"], "batch_norm": True, "num_classes": 3,
                               "classifier_hidden": 8}))
    convert(str(tmp_path / "bn.pth"), str(tmp_path / "ok"), "vgg", str(cfg))
    x = torch.randn(2, 3, 20, 20, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)
    with jax.default_matmul_precision("float32"):
        got = embed.embed(str(tmp_path / "ok"), x.numpy())
    assert max_abs(got["logits"], ref["logits"].numpy()) <= PARITY_TOL
    state = model.state_dict()
    for stat in ("running_mean", "running_var", "num_batches_tracked"):
        state.pop(f"features.5.{stat}")  # the second conv's BatchNorm
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ConversionError, match=r"features\.5\.weight"):
        convert(str(tmp_path / "broken.pth"), str(tmp_path / "bad"), "vgg", str(cfg))
    with pytest.raises(ConversionError, match=r"features\.1\.weight"):  # a _bn file for a plain VGG config
        convert(str(tmp_path / "bn.pth"), str(tmp_path / "bad2"), "vgg16")


def test_wrong_family_is_named(tmp_path):
    proc = run_cli("converters", fixture_path("vgg", "checkpoint.pth"), str(tmp_path / "o"), "--model", "resnet50",
                   check=False)
    assert proc.returncode == 2 and "not a resnet checkpoint" in proc.stderr and "vgg" in proc.stderr
