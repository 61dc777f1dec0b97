"""DINOv3's distilled ConvNeXts (family dinov3_convnext): parity with the public fixture and with transformers'
DINOv3ConvNextModel (random perturbed weights, two input sizes), the same weights in the official
facebookresearch/dinov3 naming, Grad-CAM on the last stage, grayscale training, partial freezing in network order,
full-size parameter counts and a ViT file refused."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from medjax import classifier, engine, explain, models, rules, testing
from medjax.convert import CheckpointError, convert
from medjax.models import VARIANTS
from medjax.models.dinov3_convnext import DINOv3ConvNextConfig
from medjax.pretrained import flatten
from medjax.schema import make

transformers = pytest.importorskip("transformers")

CONVNEXT = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 2, 1, 1], layer_scale_init_value=0.5)
TINY_CONVNEXT = dict(dims=(8, 16, 24, 32), depths=(1, 2, 1, 1), img_size=64)


def _images(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def hf_convnext(tmp_path_factory):
    """(perturbed transformers model, its converted folder, the conversion's metadata), from save_pretrained output."""
    torch.manual_seed(20)
    model = transformers.DINOv3ConvNextModel(transformers.DINOv3ConvNextConfig(**CONVNEXT))
    model = testing.perturb_(model, seed=21).eval()
    root = tmp_path_factory.mktemp("convnext")
    model.save_pretrained(root / "hf")
    meta = convert(str(root / "hf"), str(root / "jx"), "dinov3_convnext")
    assert meta["num_params"] == sum(p.numel() for p in model.parameters())
    return model, str(root / "jx"), meta


def test_public_fixture(tmp_path, family="dinov3_convnext"):
    got = testing.transformers_fixture_outputs(tmp_path, family)
    assert np.array_equal(got["linear_head_input"], got["pooler_output"])


@pytest.mark.parametrize("size", [(64, 64), (96, 64)])
def test_transformers_parity(hf_convnext, size):
    model, params_dir, _ = hf_convnext
    images = _images((2, 3, *size), seed=size[0])
    _, _, got = testing.apply_converted(params_dir, images)
    with torch.no_grad():
        ref = model(torch.from_numpy(images))
    assert testing.max_abs(got["last_hidden_state"], ref.last_hidden_state.numpy()) <= testing.PARITY_TOL
    assert testing.max_abs(got["pooler_output"], ref.pooler_output.numpy()) <= testing.PARITY_TOL
    assert got["last_hidden_state"].shape == (2, 1 + (size[0] // 32) * (size[1] // 32), 32)


def test_official_naming(hf_convnext, tmp_path):
    model, _, meta = hf_convnext
    sd = {k.removeprefix("model."): v for k, v in model.state_dict().items()}  # transformers 5: model.stages.N
    hub = {"norm.weight": sd["layer_norm.weight"], "norm.bias": sd["layer_norm.bias"],
           "norms.3.weight": sd["layer_norm.weight"], "norms.3.bias": sd["layer_norm.bias"]}
    names = {"depthwise_conv": "dwconv", "layer_norm": "norm", "pointwise_conv1": "pwconv1",
             "pointwise_conv2": "pwconv2", "gamma": "gamma"}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "stages" and parts[2] == "downsample_layers":
            hub[f"downsample_layers.{parts[1]}.{'.'.join(parts[3:])}"] = value
        elif parts[0] == "stages":
            suffix = "" if parts[4] == "gamma" else f".{parts[5]}"
            hub[f"stages.{parts[1]}.{parts[3]}.{names[parts[4]]}{suffix}"] = value
    torch.save(hub, tmp_path / "hub.pth")
    (tmp_path / "hub.json").write_text(json.dumps({"depths": CONVNEXT["depths"], "dims": CONVNEXT["hidden_sizes"]}))
    got_meta = convert(str(tmp_path / "hub.pth"), str(tmp_path / "jx"), "dinov3_convnext",
                       str(tmp_path / "hub.json"))
    assert got_meta["source"]["format"] == "dinov3_convnext_hub" and got_meta["num_params"] == meta["num_params"]
    images = _images((1, 3, 64, 96), seed=3)
    _, _, got = testing.apply_converted(str(tmp_path / "jx"), images)
    with torch.no_grad():
        ref = model(torch.from_numpy(images))
    assert testing.max_abs(got["last_hidden_state"], ref.last_hidden_state.numpy()) <= testing.PARITY_TOL


def test_gradcam_on_the_last_stage(hf_convnext, matmul_f32):
    _, params_dir, _ = hf_convnext
    config, variables, _ = models.load_pretrained(params_dir)
    assert models.family("dinov3_convnext").explain_method(config) == "gradcam"
    clf = classifier.Classifier(config, 3)
    w = np.random.default_rng(0).standard_normal((32, 3)).astype(np.float32)
    clf_vars = {"params": {"backbone": variables["params"], "head": {"kernel": w, "bias": np.zeros(3, np.float32)}}}
    images = jnp.asarray(_images((2, 3, 64, 96), seed=2).transpose(0, 2, 3, 1))
    heat = np.asarray(explain.gradcam(clf, clf_vars, images, jnp.asarray([0, 2])))
    assert heat.shape == (2, 2, 3) and heat.max() > 0


@pytest.mark.slow  # ~25 s of CPU, mostly XLA compiling the depthwise convolutions' gradients
def test_grayscale_training_moves_every_parameter():
    config = make({"model.family": "dinov3_convnext", "model.architecture": TINY_CONVNEXT, "image_size": 64,
                   "compute_dtype": "float32", "optim.lr": 1e-2, "optim.schedule": "constant",
                   "model.freeze": "full"})
    e = engine.build(config, num_classes=3, channels=1, task="multiclass", total_steps=10)
    before, changed = testing.train_two_steps(e, 64)
    assert before["backbone/stages_0/downsample_conv/kernel"].shape[2] == 1
    assert changed == set(before)


def test_partial_freezing_follows_network_order():
    config = DINOv3ConvNextConfig(**TINY_CONVNEXT)
    family = models.family("dinov3_convnext")
    tree = {"backbone": jax.tree_util.tree_map(lambda s: np.zeros(s.shape), models.param_shapes(config)),
            "head": {"kernel": np.zeros((32, 3)), "bias": np.zeros(3)}}
    cfg = make({"model.freeze": "partial", "model.unfreeze_from_block": 2}).model
    mask = flatten(rules.trainable_mask(tree, rules.trainable_rules(cfg, family, config)))
    order = ["stages_0/blocks_0", "stages_1/blocks_0", "stages_1/blocks_1", "stages_2/blocks_0", "stages_3/blocks_0"]
    for i, block in enumerate(order):
        paths = [k for k in mask if k.startswith(f"backbone/{block}/")]
        assert paths and all(mask[k] == (i >= 2) for k in paths), block
    assert not any(v for k, v in mask.items() if k.startswith("backbone/stages_0/downsample_"))
    # a stage's downsampling goes with the block it feeds: stages_1's with block 1 (frozen), stages_2's with 3
    assert not any(v for k, v in mask.items() if k.startswith("backbone/stages_1/downsample_"))
    assert all(v for k, v in mask.items() if k.startswith("backbone/stages_2/downsample_"))
    assert mask["backbone/norm/scale"] and mask["head/kernel"]
    assert len(family.layer_patterns(config)) == 1 + sum(config.depths)


# sum(p.numel() for p in model.parameters()) of the official facebookresearch/dinov3 ConvNeXts built with these
# variants' arguments (on the meta device)
OFFICIAL_PARAMS = {"dinov3_convnext_tiny": 27_820_128, "dinov3_convnext_small": 49_454_688,
                   "dinov3_convnext_base": 87_566_464, "dinov3_convnext_large": 196_230_336}


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_variant_parameter_counts_equal_upstream(name):
    family, kwargs = VARIANTS[name]
    config = models.FAMILIES[family].converter.parse_config(kwargs)
    with torch.device("meta"):
        ref = transformers.DINOv3ConvNextModel(transformers.DINOv3ConvNextConfig(
            hidden_sizes=list(config.dims), depths=list(config.depths)))
    ours = models.count_params(models.param_shapes(config))
    assert ours == sum(p.numel() for p in ref.parameters()) == OFFICIAL_PARAMS[name]
    assert sorted(OFFICIAL_PARAMS) == sorted(n for n, (f, _) in VARIANTS.items() if f == "dinov3_convnext")


@pytest.mark.slow
def test_full_size_random_model(tmp_path, name="dinov3_convnext_tiny"):
    torch.manual_seed(0)
    model = testing.perturb_(transformers.DINOv3ConvNextModel(transformers.DINOv3ConvNextConfig()), seed=1).eval()
    model.save_pretrained(tmp_path / "hf")
    convert(str(tmp_path / "hf"), str(tmp_path / "jx"), name)
    images = _images((1, 3, 224, 224), seed=4)
    _, _, got = testing.apply_converted(str(tmp_path / "jx"), images)
    with torch.no_grad():
        ref = model(torch.from_numpy(images))
    assert testing.max_abs(got["last_hidden_state"], ref.last_hidden_state.numpy()) <= 1e-4


def test_a_vit_file_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not a dinov3_convnext checkpoint"):
        convert(testing.fixture_path("dinov3", "model.safetensors"), str(tmp_path / "c"), "dinov3_convnext_tiny")
