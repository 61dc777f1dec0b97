"""The SigLIP family (transformers' SiglipVisionModel: SigLIP, SigLIP 2 fixed resolution, MedSigLIP).

Proof: the public fixture (upstream outputs) through both CLIs; transformers' PyTorch models with perturbed weights
saved with `save_pretrained` and converted from those files (the attention-pooling head, no head, a whole SiglipModel
with its text tower, the position table resized to other and non-square input sizes), parameter counts of the variants
against transformers' own models, the converter's key checks; then the family in the trainer, the protocols (linear
probe, kNN), LoRA, Grad-CAM and the export."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from medjax import models, testing
from medjax.conversion import CheckpointError, ConversionError
from medjax.convert import convert
from medjax.models.siglip import convert as siglip
from medjax.testing import PARITY_TOL, fixture_path, max_abs, perturb_

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96, patch_size=8,
            image_size=32)


def _images(batch, height, width, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 3, height, width)).astype(np.float32)


def _medjax(params_dir, images):
    config, variables, _ = models.load_pretrained(params_dir)
    with jax.default_matmul_precision("float32"):
        out = jax.jit(models.build_backbone(config).apply)(variables, jnp.asarray(images.transpose(0, 2, 3, 1)))
    return config, variables, {k: np.asarray(v) for k, v in out.items()}


def _check(got: dict, pairs: dict, tol=PARITY_TOL):
    for key, ref in pairs.items():
        diff = max_abs(got[key], ref)
        assert diff <= tol, f"{key}: max abs diff {diff:.3g}"


def _tiny_model(tmp_path, seed=1, **changes):
    torch.manual_seed(0)
    model = perturb_(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**{**TINY, **changes})), seed)
    model.eval().save_pretrained(tmp_path / "hf")
    return model, str(tmp_path / "hf")


# ------------------------------------------------------------------------------------------------ fixture


def test_fixture_parity_through_clis(tmp_path):
    got, expected, stdout = testing.convert_and_embed(tmp_path, "siglip", "model.safetensors", "siglip",
                                                      fixture_path("siglip", "config.json"))
    assert sorted(testing.assert_fixture_outputs(got, expected, "siglip")) == ["last_hidden_state", "pooler_output"]
    assert max_abs(got["linear_head_input"], expected["pooler_output"]) <= PARITY_TOL
    assert max_abs(got["attention_head_input"], expected["last_hidden_state"]) <= PARITY_TOL
    meta = json.loads(stdout.strip().splitlines()[-1])
    assert (meta["format"], meta["num_params"]) == ("siglip_transformers", 94896)


# ------------------------------------------------------------------------------------------------ transformers


def test_transformers_vision_model_with_its_pooling_head(tmp_path):
    """SiglipVisionModel: gelu_pytorch_tanh, eps 1e-6, post_layernorm, the MAP head; at the stored size, then at a
    non-square size, where the position table follows as with transformers' interpolate_pos_encoding=True."""
    model, path = _tiny_model(tmp_path)
    meta = convert(path, str(tmp_path / "jx"), "siglip")
    assert meta["num_params"] == sum(p.numel() for p in model.parameters())
    assert len(meta["source"]["sha256"]) == 64
    for (h, w), interpolate in (((32, 32), False), ((40, 56), True)):
        images = _images(2, h, w, seed=h + w)
        with torch.no_grad():
            ref = model(torch.from_numpy(images), interpolate_pos_encoding=interpolate)
        config, _, got = _medjax(str(tmp_path / "jx"), images)
        assert (config.act, config.norm_eps, config.use_head) == ("gelu_tanh", 1e-6, True)
        last, pooled = ref.last_hidden_state.numpy(), ref.pooler_output.numpy()
        _check(got, {"last_hidden_state": last, "pooler_output": pooled, "linear_head_input": pooled,
                     "attention_head_input": last})


def test_position_table_resize_is_transformers_interpolate_pos_encoding(tmp_path, matmul_f32):
    """The resized table alone, against the upstream method (a bigger grid and a non-square one)."""
    from medjax.models.siglip import position_table

    model, path = _tiny_model(tmp_path, seed=2)
    convert(path, str(tmp_path / "jx"), "siglip")
    config, variables, _ = models.load_pretrained(str(tmp_path / "jx"))
    for h, w in ((64, 64), (24, 48)):
        embeddings = torch.zeros(1, (h // 8) * (w // 8), 48)
        with torch.no_grad():
            ref = model.embeddings.interpolate_pos_encoding(embeddings, h, w).numpy()
        got = position_table(config, jnp.asarray(variables["params"]["pos_embed"]), (h // 8, w // 8), (h, w))
        assert max_abs(got, ref) <= 1e-6


def test_no_head_and_exact_gelu(tmp_path):
    """vision_use_head=False (no pooler_output: the linear head reads the token mean, as
    SiglipForImageClassification pools) and hidden_act 'gelu' (the erf form)."""
    model, path = _tiny_model(tmp_path, seed=3, vision_use_head=False, hidden_act="gelu")
    meta = convert(path, str(tmp_path / "jx"), "siglip")
    assert meta["num_params"] == sum(p.numel() for p in model.parameters())
    images = _images(2, 32, 32, seed=4)
    with torch.no_grad():
        last = model(torch.from_numpy(images)).last_hidden_state.numpy()
    config, _, got = _medjax(str(tmp_path / "jx"), images)
    assert (config.act, config.use_head) == ("gelu", False) and "pooler_output" not in got
    _check(got, {"last_hidden_state": last, "linear_head_input": last.mean(axis=1)})


def test_whole_siglip_model_file_gives_its_vision_tower(tmp_path):
    """A whole SiglipModel (google/siglip*-style files: `vision_model.*` beside `text_model.*`, logit_scale and
    logit_bias): the vision tower is taken, the rest skipped; its config.json's vision_config is read."""
    torch.manual_seed(0)
    config = transformers.SiglipConfig(
        vision_config=TINY, text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, vocab_size=100, max_position_embeddings=16))
    model = perturb_(transformers.SiglipModel(config), seed=5).eval()
    model.save_pretrained(tmp_path / "hf")
    meta = convert(str(tmp_path / "hf"), str(tmp_path / "jx"), "siglip")
    assert meta["num_params"] == sum(p.numel() for p in model.vision_model.parameters())
    images = _images(2, 32, 32, seed=6)
    with torch.no_grad():
        ref = model.vision_model(torch.from_numpy(images))
        features = model.get_image_features(pixel_values=torch.from_numpy(images))
    features = getattr(features, "pooler_output", features)
    _, _, got = _medjax(str(tmp_path / "jx"), images)
    _check(got, {"last_hidden_state": ref.last_hidden_state.numpy(), "pooler_output": features.numpy()})


SIZES = {  # variant -> upstream vision tower parameters (transformers' SiglipVisionModel on the meta device)
    "siglip_so400m_patch14_384": 428_225_600,
    "siglip2_base_patch16_224": 92_884_224,
    "siglip2_base_patch16_512": 93_520_128,
    "medsiglip_448": 428_565_440,
}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_variant_parameter_counts_equal_upstream(name):
    family, kwargs = models.VARIANTS[name]
    config = models.FAMILIES[family].converter.parse_config(kwargs)
    with torch.device("meta"):
        hf = transformers.SiglipVisionModel(transformers.SiglipConfig(**kwargs).vision_config)
    assert models.count_params(models.param_shapes(config)) == sum(p.numel() for p in hf.parameters()) == SIZES[name]


# ------------------------------------------------------------------------------------------------ key checks


def test_key_checks_are_loud(tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = _tiny_model(tmp_path, seed=7)
    state = load_file(f"{path}/model.safetensors")
    broken = {k: v for k, v in state.items() if k != "head.probe"}
    broken["head.extra.weight"] = torch.zeros(2)
    broken["encoder.layers.1.mlp.fc1.weight"] = torch.zeros(96, 40)
    save_file(broken, f"{path}/model.safetensors")
    with pytest.raises(ConversionError) as e:
        convert(path, str(tmp_path / "jx"), "siglip")
    assert [m.split(" ")[0] for m in e.value.missing] == ["head.probe"]
    assert e.value.unexpected[0].startswith("head.extra.weight")
    assert "encoder.layers.1.mlp.fc1.weight: checkpoint gives (40, 96)" in e.value.mismatched[0]
    assert not (tmp_path / "jx").exists()  # nothing half-written
    proc = testing.run_cli("converters", path, str(tmp_path / "jx"), "--model", "siglip", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "head.probe" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("change,named", [
    ({"model_type": "siglip2"}, "'siglip_vision_model', 'siglip'"),
    ({"hidden_act": "relu"}, "hidden_act 'relu'"),
    ({"image_size": [32, 48]}, "must be square"),
    ({"hidden_size": 50}, "not divisible by num_heads"),
])
def test_unsupported_configs_are_refused_by_name(change, named):
    with pytest.raises(CheckpointError, match=re.escape(named)):
        siglip.parse_config({"model_type": "siglip_vision_model", **TINY, **change})


# ------------------------------------------------------------------------------------------------ the contract


def test_family_facts():
    config = siglip.parse_config(models.VARIANTS["siglip2_base_patch16_224"][1])
    family, paths, depth = testing.layer_depths("siglip", config)
    assert depth["patch_embed/kernel"] == depth["pos_embed"] == 0
    assert depth["blocks_0/attn/qkv/kernel"] == 1 and depth["blocks_11/mlp/fc2/bias"] == 12
    assert depth["post_layernorm/scale"] == depth["head/probe"] == depth["head/mlp/fc1/kernel"] == 13
    lora = testing.lora_paths(family, config, paths)
    assert len(lora) == 12 * 3 and all(p.endswith("kernel") and p.startswith("blocks_") for p in lora)
    assert family.stem in paths and family.max_taps(config) == 1
    assert family.explain_method(config) == "gradcam" and family.gradcam_layer(config) == "token_grid"


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    return testing.convert_fixture(tmp_path_factory.mktemp("siglip") / "jx", "siglip", "model.safetensors")


def test_protocol_taps_are_the_pooled_output_and_the_token_mean(fixture_dir, matmul_f32):
    """No CLS token: the protocols' "CLS" is the attention-pooling head's output, `patch_mean` the mean of the
    post-layernormed tokens (both from the upstream outputs of the fixture)."""
    config, variables, _ = models.load_pretrained(fixture_dir)
    images = np.load(fixture_path("siglip", "images.npy")).transpose(0, 2, 3, 1)
    taps = jax.jit(models.family("siglip").feature_fn(config, 1))(variables, jnp.asarray(images))
    expected = np.load(fixture_path("siglip", "expected.npz"))
    _check(taps, {"cls": expected["pooler_output"][:, None],
                  "patch_mean": expected["last_hidden_state"].mean(axis=1)})
    with pytest.raises(ValueError, match="offers 1..1"):
        models.family("siglip").feature_fn(config, 4)


def _config(fixture_dir, **overrides):
    from medjax.schema import make

    return make({"model.family": "siglip", "model.pretrained": fixture_dir, "image_size": 32,
                 "compute_dtype": "float32", "optim.lr": 1e-2, "batch_size": 4, "model.attention_head.width": 16,
                 "model.attention_head.depth": 1, "model.attention_head.num_heads": 2, "model.attention_head.grid": 4,
                 **overrides})


@pytest.mark.parametrize("head,freeze", [("linear", "partial"),
                                       pytest.param("attention", "full", marks=pytest.mark.slow)])
def test_trains_in_the_engine(fixture_dir, head, freeze):
    """The converted tower in the trainer's one build path: grayscale data (the stem reduced to one channel), both
    heads, partial (from block 1: the embeddings and block 0 stay) / full; two steps update exactly the trainable
    parameters (the pooling head comes after the blocks; with the attention head it only meets weight decay)."""
    from medjax import engine

    cfg = _config(fixture_dir, **{"model.head": head, "model.freeze": freeze, "model.unfreeze_from_block": 1})
    eng = engine.build(cfg, num_classes=3, channels=1, task="multiclass", total_steps=4)
    before, changed = testing.train_two_steps(eng, 32)
    assert before["backbone/patch_embed/kernel"].shape == (8, 8, 1, 48)
    parts = ("patch_embed", "pos_embed", "blocks_0", "blocks_1", "post_layernorm", "head/")
    trained = {"partial": parts[3:], "full": parts}[freeze]
    for part in parts:
        moved = {k for k in changed if k.startswith(f"backbone/{part}")}
        assert bool(moved) == (part in trained), (part, sorted(moved)[:3])
    assert any(not k.startswith("backbone/") for k in changed)  # the classifier's head trains


@pytest.mark.slow
def test_lora_adapts_the_blocks_and_trains_only_adapters_and_head(fixture_dir):
    from medjax import engine

    cfg = _config(fixture_dir, **{"model.peft": "lora", "model.lora.rank": 4})
    eng = engine.build(cfg, num_classes=3, channels=1, task="multiclass", total_steps=4)
    before, changed = testing.train_two_steps(eng, 32)
    adapted = {k.rsplit("/", 1)[0] for k in before if k.startswith("lora/")}
    assert len(adapted) == 2 * 3 and all(re.search(r"blocks_\d/(attn/qkv|mlp/fc[12])", k) for k in adapted)
    assert changed and not any(k.startswith("backbone/") for k in changed)


def test_linear_probe_and_knn_protocols(fixture_dir, tmp_path, capsys):
    from medjax.data import fake
    from medjax.protocols.__main__ import main as cli_main

    root = fake.write("aptos2019", str(tmp_path / "aptos"), 40, seed=0, size=32)["root"]
    args = ["--params", fixture_dir, "--dataset", "aptos2019", "--root", root, "--workdir", str(tmp_path / "w"),
            "--image-size", "32", "--extract-batch-size", "16"]
    assert cli_main(["probe", *args, "--blocks", "1,4", "--lrs", "0.01", "--epochs", "2"]) == 0
    probe = json.loads(capsys.readouterr().out)
    assert len(probe["grid"]) == 2 and len(probe["skipped_heads"]) == 2  # one tap (the pooled output), not 4
    assert "quadratic_kappa" in probe["test"]
    assert cli_main(["knn", *args]) == 0
    knn = json.loads(capsys.readouterr().out)
    assert knn["features"]["cached"] == ["train", "val", "test"] and knn["method"] == "weighted_knn"


def test_gradcam_reads_the_token_grid(fixture_dir, matmul_f32):
    """Grad-CAM on the post-layernormed tokens as a patch grid, through the attention-pooling head and a linear
    classifier: a_k = mean over patches of d logit_c / d A_k, computed here with jax.grad of the logit as a function
    of the tokens (the classifier applied to the head's output, written out)."""
    from medjax import classifier, explain
    from medjax.models.siglip.model import MapHead

    config, variables, _ = models.load_pretrained(fixture_dir)
    rng = np.random.default_rng(0)
    head = {"kernel": rng.standard_normal((48, 3)).astype(np.float32), "bias": np.zeros(3, np.float32)}
    model = classifier.Classifier(config, 3)
    params = {"params": {"backbone": variables["params"], "head": head}}
    images = jnp.asarray(np.load(fixture_path("siglip", "images.npy")).transpose(0, 2, 3, 1))
    classes = jnp.asarray([2, 0])
    got = np.asarray(jax.jit(lambda v, x, c: explain.gradcam(model, v, x, c))(params, images, classes))
    tokens = jax.jit(models.build_backbone(config).apply)(variables, images)["last_hidden_state"]
    pool = MapHead(config)

    def logit(t, c):
        pooled = pool.apply({"params": variables["params"]["head"]}, t[None])[0]
        return (pooled @ head["kernel"] + head["bias"])[c]

    grads = jax.jit(jax.vmap(jax.grad(logit)))(tokens, classes)  # (B, N, D)
    weights = grads.mean(axis=1)
    expected = np.maximum(np.einsum("bnd,bd->bn", np.asarray(tokens), np.asarray(weights)), 0).reshape(2, 4, 4)
    assert got.shape == (2, 4, 4) and expected.max() > 0
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * expected.max())


@pytest.mark.slow
def test_run_export_predict_and_explain_through_the_clis(tmp_path):
    """A SigLIP run as a user starts it (the demo's data and recipe, the fixture converted on first use, 32 px); its
    safetensors export, which predict reads with the run's own test metrics; explain (Grad-CAM by default)."""
    workdir, data_root, folder = tmp_path / "run", tmp_path / "data", tmp_path / "export"
    testing.run_cli("medjax.main", "--config=configs/demo.py", f"--workdir={workdir}",
                    f"--config.data_root={data_root}", "--config.fake_data=96", "--config.epochs=1",
                    "--config.batch_size=8", "--config.progress_bar=False", "--config.image_size=32",
                    "--config.model.family=siglip",
                    f"--config.model.convert_from.checkpoint={fixture_path('siglip', 'model.safetensors')}",
                    "--config.model.convert_from.model=siglip",
                    f"--config.model.convert_from.config={fixture_path('siglip', 'config.json')}")
    testing.run_cli("medjax.export", "--workdir", str(workdir), "--output", str(folder))
    config, _, _ = models.load_pretrained(str(folder))
    assert config.family == "siglip" and config.in_chans == 1
    testing.run_cli("medjax.predict", "--workdir", str(folder), "--dataset", "chexpert", "--root", str(data_root),
                    "--output", str(tmp_path / "preds.csv"), "--metrics", str(tmp_path / "m.json"), "--no-progress")
    test = json.load(open(workdir / "metrics.json"))["test"]
    predicted = json.load(open(tmp_path / "m.json"))
    assert predicted["num_examples"] == test["num_examples"] > 0
    assert abs(predicted["mean_auc"] - test["mean_auc"]) <= 1e-6
    images = sorted(str(p) for p in (data_root / "valid").rglob("*.jpg"))[:2]
    testing.run_cli("medjax.explain", "--workdir", str(workdir), "--images", *images, "--output",
                    str(tmp_path / "maps"))
    assert len(list((tmp_path / "maps").glob("*.png"))) == 2  # beside explanations.csv


# ------------------------------------------------------------------------------------------------ full size


@pytest.mark.slow
def test_full_size_siglip2_base_random(tmp_path):
    """SigLIP 2-B/16's tower (google/siglip2-base-patch16-224's vision_config: the SiglipVisionConfig defaults) with
    perturbed random weights, at 224 px and at 256x192, against transformers (1e-4)."""
    torch.manual_seed(0)
    _, kwargs = models.VARIANTS["siglip2_base_patch16_224"]
    model = perturb_(transformers.SiglipVisionModel(transformers.SiglipConfig(**kwargs).vision_config), seed=1)
    model.eval().save_pretrained(tmp_path / "hf")
    meta = convert(str(tmp_path / "hf"), str(tmp_path / "jx"), "siglip2_base_patch16_224")
    assert meta["num_params"] == SIZES["siglip2_base_patch16_224"]
    config, variables, _ = models.load_pretrained(str(tmp_path / "jx"))
    apply = jax.jit(models.build_backbone(config).apply)
    for h, w in ((224, 224), (256, 192)):  # the stored size, then a non-square one (the table resized)
        images = _images(1, h, w, seed=h)
        with torch.no_grad():
            ref = model(torch.from_numpy(images), interpolate_pos_encoding=(h, w) != (224, 224))
        with jax.default_matmul_precision("float32"):
            out = apply(variables, jnp.asarray(images.transpose(0, 2, 3, 1)))
        assert max_abs(out["last_hidden_state"], ref.last_hidden_state.numpy()) <= 1e-4
        assert max_abs(out["pooler_output"], ref.pooler_output.numpy()) <= 1e-4
