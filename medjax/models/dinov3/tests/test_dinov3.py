"""DINOv3 ViT (family dinov3): parity with the public fixture and with transformers' DINOv3ViTModel (random perturbed
weights; plain and gated MLP at the config's size, non-square and non-multiple sizes), the same weights in the
official facebookresearch/dinov3 naming (fused qkv with its key-bias mask, storage tokens, RoPE periods read from the
file), the protocol taps against transformers' hidden states, attention rollout against transformers' attentions,
training, LoRA, full-size parameter counts and bad inputs. The distilled ConvNeXts' tests are beside their family
(medjax/models/dinov3_convnext/tests)."""

import csv
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from medjax import classifier, engine, explain, models
from medjax.convert import CheckpointError, ConversionError, convert
from medjax.errors import UserError
from medjax.models import VARIANTS
from medjax.models.dinov3 import DINOv3Config
from medjax.models.dinov3.convert import swiglu_hidden
from medjax.pretrained import flatten
from medjax.schema import make
from medjax.testing import (
    PARITY_TOL,
    ROOT,
    apply_converted,
    fixture_path,
    max_abs,
    perturb_,
    train_two_steps,
    transformers_fixture_outputs,
)

transformers = pytest.importorskip("transformers")

PLAIN = dict(hidden_size=48, num_attention_heads=3, num_hidden_layers=2, intermediate_size=96, patch_size=8,
             image_size=32, num_register_tokens=4, layerscale_value=0.5)
GATED = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=3, intermediate_size=80, patch_size=4,
             image_size=16, num_register_tokens=2, use_gated_mlp=True, hidden_act="silu", key_bias=True,
             proj_bias=False, rope_theta=50.0)
# no registers (transformers still saves an empty register_tokens), no q / v / MLP biases, tanh GELU, another eps and
# RoPE base, a non-square nominal image_size
BARE = dict(PLAIN, num_register_tokens=0, mlp_bias=False, query_bias=False, value_bias=False, layer_norm_eps=1e-6,
            rope_theta=1000.0, image_size=[32, 48], hidden_act="gelu_pytorch_tanh")


def _nhwc(x):
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def _images(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _hf_vit(kw, seed):
    torch.manual_seed(seed)
    model = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**kw, attn_implementation="eager"))
    inv_freq = model.rope_embeddings.inv_freq.clone()
    perturb_(model, seed=seed + 1)  # LayerScale, norms, biases, tokens off their init ...
    model.rope_embeddings.inv_freq.copy_(inv_freq)  # ... but not the (non-persistent) RoPE frequencies
    return model.eval()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (torch model, converted folder), from save_pretrained output (config.json beside the weights)."""
    out = {}
    for seed, (name, make_model) in enumerate([("plain", lambda s: _hf_vit(PLAIN, s)),
                                               ("gated", lambda s: _hf_vit(GATED, s)),
                                               ("bare", lambda s: _hf_vit(BARE, s))]):
        model = make_model(10 * seed)
        root = tmp_path_factory.mktemp(name)
        model.save_pretrained(root / "hf")
        meta = convert(str(root / "hf"), str(root / "jx"), "dinov3")
        assert meta["num_params"] == sum(p.numel() for n, p in model.named_parameters() if "mask_token" not in n)
        out[name] = (model, str(root / "jx"), meta)
    return out


# ------------------------------------------------------------------------------------------------ (a) fixtures


def test_public_fixture(tmp_path, family="dinov3"):
    got = transformers_fixture_outputs(tmp_path, family)
    assert np.array_equal(got["linear_head_input"], got["pooler_output"])


# ------------------------------------------------------------------------------------------------ (b) transformers


VIT_CASES = {  # model, (H, W): the config's size, then other sizes and aspect ratios (RoPE recomputed per grid)
    "plain_config_size": ("plain", (32, 32)), "plain_non_square": ("plain", (48, 24)),
    "plain_not_a_multiple": ("plain", (35, 29)), "gated_config_size": ("gated", (16, 16)),
    "gated_non_square": ("gated", (20, 28)), "bare_non_square": ("bare", (24, 40)),
}


@pytest.mark.parametrize("case", list(VIT_CASES))
def test_vit_transformers_parity(hf_models, case):
    name, (h, w) = VIT_CASES[case]
    model, params_dir, _ = hf_models[name]
    images = _images((2, 3, h, w), seed=h * w)
    config, variables, got = apply_converted(params_dir, images)
    with torch.no_grad():
        ref = model(torch.from_numpy(images), output_hidden_states=True)
    first = 1 + config.num_registers
    expected = {"last_hidden_state": ref.last_hidden_state, "pooler_output": ref.pooler_output,
                "x_prenorm": ref.hidden_states[-1], "attention_head_input": ref.hidden_states[-1][:, first:]}
    for key, value in expected.items():
        assert max_abs(got[key], value.numpy()) <= PARITY_TOL, key
    # the protocol taps: the final-normed CLS of the last n blocks and the last block's normed patch mean
    with torch.no_grad():
        normed = [model.norm(x).numpy() for x in ref.hidden_states[-2:]]
    with jax.default_matmul_precision("float32"):
        taps = jax.jit(models.family("dinov3").feature_fn(config, 2))(variables, _nhwc(images))
    assert max_abs(taps["cls"], np.stack([x[:, 0] for x in normed], axis=1)) <= PARITY_TOL
    assert max_abs(taps["patch_mean"], normed[-1][:, first:].mean(axis=1)) <= PARITY_TOL


# ------------------------------------------------------------------------------------------------ official naming


def _hub_vit_state(model, bf16_periods=True):
    """The torch model's weights in facebookresearch/dinov3's naming: qkv fused, the key bias masked (bias_mask),
    storage tokens, the RoPE periods as a bfloat16 buffer like the released files; returns (state, periods)."""
    cfg, sd = model.config, {k.removeprefix("model."): v.detach().clone() for k, v in model.state_dict().items()}
    dim = cfg.hidden_size
    hub = {"cls_token": sd["embeddings.cls_token"], "storage_tokens": sd["embeddings.register_tokens"],
           "mask_token": sd["embeddings.mask_token"][0],
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"], "norm.weight": sd["norm.weight"],
           "norm.bias": sd["norm.bias"]}
    periods = (1 / model.rope_embeddings.inv_freq).to(torch.bfloat16 if bf16_periods else torch.float32)
    hub["rope_embed.periods"] = periods
    mlp = {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"} if cfg.use_gated_mlp else \
        {"up_proj": "fc1", "down_proj": "fc2"}
    for i in range(cfg.num_hidden_layers):
        src, dst = f"layer.{i}", f"blocks.{i}"
        hub[f"{dst}.attn.qkv.weight"] = torch.cat([sd[f"{src}.attention.{n}_proj.weight"] for n in "qkv"])
        k_bias = sd.get(f"{src}.attention.k_proj.bias", torch.randn(dim))  # masked: any value
        hub[f"{dst}.attn.qkv.bias"] = torch.cat([sd[f"{src}.attention.q_proj.bias"], k_bias,
                                                 sd[f"{src}.attention.v_proj.bias"]])
        if not cfg.key_bias:
            hub[f"{dst}.attn.qkv.bias_mask"] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
        for a, b in [("attention.o_proj", "attn.proj"), ("norm1", "norm1"), ("norm2", "norm2"),
                     *[(f"mlp.{k}", f"mlp.{v}") for k, v in mlp.items()]]:
            for p in ("weight", "bias"):
                if f"{src}.{a}.{p}" in sd:
                    hub[f"{dst}.{b}.{p}"] = sd[f"{src}.{a}.{p}"]
        hub[f"{dst}.ls1.gamma"] = sd[f"{src}.layer_scale1.lambda1"]
        hub[f"{dst}.ls2.gamma"] = sd[f"{src}.layer_scale2.lambda1"]
    return hub, periods.float()


def _hub_vit_kwargs(cfg):
    return {"img_size": cfg.image_size, "patch_size": cfg.patch_size, "pos_embed_rope_base": cfg.rope_theta,
            "pos_embed_rope_dtype": "fp32", "pos_embed_rope_rescale_coords": 2, "embed_dim": cfg.hidden_size,
            "depth": cfg.num_hidden_layers, "num_heads": cfg.num_attention_heads,
            "ffn_ratio": cfg.intermediate_size / cfg.hidden_size * (1.5 if cfg.use_gated_mlp else 1),
            "qkv_bias": True, "mask_k_bias": not cfg.key_bias, "layerscale_init": 1e-5,
            "norm_layer": "layernormbf16", "ffn_layer": "swiglu" if cfg.use_gated_mlp else "mlp",
            "proj_bias": cfg.proj_bias, "n_storage_tokens": cfg.num_register_tokens}


@pytest.mark.parametrize("name", ["plain", "gated"])
def test_vit_official_naming(hf_models, tmp_path, name):
    """The same weights saved in the hub naming compute transformers' numbers once transformers' RoPE frequencies are
    the file's (bfloat16) periods: the periods are read from the file, not recomputed."""
    model, _, meta = hf_models[name]
    state, periods = _hub_vit_state(model)
    torch.save(state, tmp_path / "hub.pth")
    (tmp_path / "hub.json").write_text(json.dumps(_hub_vit_kwargs(model.config)))
    got_meta = convert(str(tmp_path / "hub.pth"), str(tmp_path / "jx"), "dinov3", str(tmp_path / "hub.json"))
    assert got_meta["source"]["format"] == "dinov3_hub" and got_meta["num_params"] == meta["num_params"]
    images = _images((2, 3, 24, 40), seed=7)
    config, variables, got = apply_converted(str(tmp_path / "jx"), images)
    assert config.rope_stored_periods and np.array_equal(variables["rope"]["periods"], periods.numpy())
    original = model.rope_embeddings.inv_freq.clone()
    try:
        model.rope_embeddings.inv_freq.copy_(1 / periods)
        with torch.no_grad():
            ref = model(torch.from_numpy(images))
    finally:
        model.rope_embeddings.inv_freq.copy_(original)
    assert max_abs(got["last_hidden_state"], ref.last_hidden_state.numpy()) <= PARITY_TOL
    with jax.default_matmul_precision("float32"):  # the taps run with the `rope` collection too
        taps = models.family("dinov3").feature_fn(config, 1)(variables, _nhwc(images))
    assert max_abs(taps["cls"][:, 0], got["pooler_output"]) <= 1e-6
    with torch.no_grad():
        exact = model(torch.from_numpy(images)).last_hidden_state.numpy()
    assert max_abs(got["last_hidden_state"], exact) > 3 * PARITY_TOL  # bfloat16 periods do change the numbers


# ------------------------------------------------------------------------------------------------ explanations


def test_rollout_reads_transformers_attentions(hf_models, matmul_f32):
    """attention_matrices (with RoPE) equal transformers' attention probabilities, head-averaged; the rollout map
    reads the CLS row over the patches after CLS and registers."""
    model, params_dir, _ = hf_models["plain"]
    config, variables, _ = models.load_pretrained(params_dir)
    clf = classifier.Classifier(config, 3)
    head = {"kernel": np.random.default_rng(0).standard_normal((48, 3)).astype(np.float32), "bias": np.zeros(3)}
    clf_vars = {"params": {"backbone": variables["params"], "head": head}}
    images = _images((2, 3, 24, 40), seed=1)
    backbone, _ = explain.attention_matrices(clf, clf_vars, _nhwc(images))
    with torch.no_grad():
        ref = model(torch.from_numpy(images), output_attentions=True).attentions
    assert len(backbone) == len(ref) == 2
    for got, want in zip(backbone, ref):
        assert max_abs(got, want.mean(dim=1).numpy()) <= 1e-5
    heat = explain.attention_rollout(clf, clf_vars, _nhwc(images))
    assert heat.shape == (2, 3, 5)
    assert models.family("dinov3").explain_method(config) == "attention"


# ------------------------------------------------------------------------------------------------ engine, protocols

TINY_VIT = dict(width=32, depth=3, num_heads=2, patch_size=8, mlp_hidden=48, num_registers=2, img_size=32)


def _engine(arch, size, **overrides):
    config = make({"model.family": "dinov3", "model.architecture": arch, "image_size": size, "compute_dtype": "float32",
                   "optim.lr": 1e-2, "optim.schedule": "constant", **overrides})
    return engine.build(config, num_classes=3, channels=1, task="multiclass", total_steps=10)


def test_grayscale_training_moves_every_parameter():
    size, stem = 32, "patch_embed/kernel"
    e = _engine(dict(TINY_VIT, gated_mlp=True), size, **{"model.freeze": "full"})
    before, changed = train_two_steps(e, size)
    assert before[f"backbone/{stem}"].shape[2] == 1
    assert changed == set(before)


def test_vit_rope_jitter_in_training_only():
    """train=True draws the RoPE rescale from the dropout stream (as upstream jitters in training mode)."""
    config = DINOv3Config(**dict(TINY_VIT, depth=1))
    model = models.build_backbone(config)
    x = jnp.asarray(_images((2, 32, 48, 3)))
    variables = model.init(jax.random.PRNGKey(0), x)
    plain = model.apply(variables, x)["last_hidden_state"]
    one = model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})["last_hidden_state"]
    again = model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})["last_hidden_state"]
    assert np.array_equal(one, again) and max_abs(one, plain) > 1e-3
    off = models.build_backbone(dataclasses.replace(config, rope_rescale=None))
    assert max_abs(off.apply(variables, x, train=True)["last_hidden_state"], plain) == 0
    remat, _ = models.family("dinov3").execution(config, None, True, False)  # model.remat: the same forward
    assert remat.remat and max_abs(models.build_backbone(remat).apply(variables, x)["last_hidden_state"], plain) == 0
    with pytest.raises(UserError, match="model.scan"):
        models.family("dinov3").execution(config, None, False, True)


def test_lora_targets_and_training():
    e = _engine(TINY_VIT, 32, **{"model.peft": "lora"})
    lora = sorted(k.rsplit("/", 2)[0] for k in flatten(jax.device_get(e.state.params["lora"])) if k.endswith("lora_a"))
    assert lora == sorted(f"backbone/blocks_{i}/{m}" for i in range(3)
                          for m in ("attn/q_proj", "attn/k_proj", "attn/v_proj", "mlp/fc1", "mlp/fc2"))
    before, changed = train_two_steps(e, 32)
    assert changed == {k for k in before if not k.startswith("backbone/")}


# ------------------------------------------------------------------------------------------------ full size


def _hf_vit_config(kwargs):
    c = models.FAMILIES["dinov3"].converter.parse_config(kwargs)
    return transformers.DINOv3ViTConfig(
        hidden_size=c.width, num_hidden_layers=c.depth, num_attention_heads=c.num_heads, intermediate_size=c.mlp_hidden,
        use_gated_mlp=c.gated_mlp, hidden_act=c.act, num_register_tokens=c.num_registers, query_bias=c.query_bias,
        value_bias=c.value_bias, key_bias=c.key_bias)


# sum(p.numel() for p in model.parameters()) of the official facebookresearch/dinov3 models built with these
# variants' arguments (DinoVisionTransformer / ConvNeXt on the meta device); they also hold the mask token and, for
# mask_k_bias, the masked key third of every qkv bias, which medjax (like transformers) leaves out
OFFICIAL_PARAMS = {"dinov3_vits16": 21_601_152, "dinov3_vits16plus": 28_697_472, "dinov3_vitb16": 85_669_632,
                   "dinov3_vitl16": 303_154_176, "dinov3_vitl16plus": 403_915_776, "dinov3_vith16plus": 840_633_600,
                   "dinov3_vit7b16": 6_716_035_072}


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_variant_parameter_counts_equal_upstream(name):
    family, kwargs = VARIANTS[name]
    config = models.FAMILIES[family].converter.parse_config(kwargs)
    with torch.device("meta"):
        ref = transformers.DINOv3ViTModel(_hf_vit_config(kwargs))
    upstream = sum(p.numel() for n, p in ref.named_parameters() if "mask_token" not in n)
    ours = models.count_params(models.param_shapes(config))
    assert ours == upstream
    assert ours == OFFICIAL_PARAMS[name] - config.width * (
        1 + (config.depth if config.query_bias and not config.key_bias else 0))
    assert sorted(OFFICIAL_PARAMS) == sorted(n for n, (f, _) in VARIANTS.items() if f == "dinov3")


@pytest.mark.slow
def test_full_size_random_model(tmp_path, name="dinov3_vits16"):
    family, kwargs = VARIANTS[name]
    torch.manual_seed(0)
    hf = _hf_vit_config(kwargs)
    hf.layerscale_value = 1e-5
    model = transformers.DINOv3ViTModel(hf)
    inv_freq = model.rope_embeddings.inv_freq.clone()
    perturb_(model, seed=1)
    model.rope_embeddings.inv_freq.copy_(inv_freq)
    size = (224, 160)
    model.eval().save_pretrained(tmp_path / "hf")
    convert(str(tmp_path / "hf"), str(tmp_path / "jx"), name)
    images = _images((1, 3, *size), seed=4)
    _, _, got = apply_converted(str(tmp_path / "jx"), images)
    with torch.no_grad():
        ref = model(torch.from_numpy(images))
    assert max_abs(got["last_hidden_state"], ref.last_hidden_state.numpy()) <= 1e-4


# ------------------------------------------------------------------------------------------------ bad inputs


def test_bad_inputs(tmp_path):
    with pytest.raises(ConversionError) as e:  # a gated file read as a plain-MLP model
        convert(fixture_path("dinov3", "model.safetensors"), str(tmp_path / "a"), "dinov3_vits16plus")
    assert "mlp" in str(e.value)
    (tmp_path / "bf16.json").write_text(json.dumps({"embed_dim": 48, "num_heads": 3, "depth": 2}))
    with pytest.raises(CheckpointError, match="pos_embed_rope_dtype='bf16'"):  # the constructor's default
        convert(fixture_path("dinov3", "model.safetensors"), str(tmp_path / "b"), "dinov3",
                str(tmp_path / "bf16.json"))
    assert swiglu_hidden(7680, 8) == 5120 and swiglu_hidden(12288, 64) == 8192


# ------------------------------------------------------------------------------------------------ a run, end to end

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dinov3_demo.py")


def _cli(module, *args):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.slow
def test_a_run_from_an_official_hub_file_predicts_explains_and_exports(hf_models, tmp_path):
    """The trainer on a hub-format checkpoint (RoPE periods in the `rope` collection), then predict, the attention
    rollout and the safetensors export, whose folder predicts the same probabilities."""
    model, _, _ = hf_models["plain"]
    state, _ = _hub_vit_state(model)
    torch.save(state, tmp_path / "hub.pth")
    (tmp_path / "hub.json").write_text(json.dumps(_hub_vit_kwargs(model.config)))
    workdir, data_root = tmp_path / "run", tmp_path / "data"
    proc = _cli("medjax.main", f"--config={DEMO}", f"--workdir={workdir}",
                f"--config.data_root={data_root}",
                "--config.fake_data=96", "--config.epochs=2", "--config.batch_size=8", "--config.progress_bar=False",
                f"--config.model.convert_from.checkpoint={tmp_path / 'hub.pth'}",
                f"--config.model.convert_from.config={tmp_path / 'hub.json'}", "--config.model.freeze=full")
    assert proc.returncode == 0, proc.stderr[-3000:]
    preds = tmp_path / "preds.csv"
    proc = _cli("medjax.predict", "--workdir", workdir, "--dataset", "chexpert", "--root", data_root, "--output", preds,
                "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = sorted(str(p) for p in (data_root / "valid").rglob("*.jpg"))[:2]
    proc = _cli("medjax.explain", "--workdir", workdir, "--images", *images, "--output", tmp_path / "maps")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len([f for f in os.listdir(tmp_path / "maps") if f.endswith(".png")]) == 2  # and explanations.csv
    proc = _cli("medjax.export", "--workdir", workdir, "--output", tmp_path / "export")
    assert proc.returncode == 0, proc.stderr[-3000:]
    config, variables, _ = models.load_pretrained(str(tmp_path / "export"))
    assert config.rope_stored_periods and variables["rope"]["periods"].shape == (4,)
    proc = _cli("medjax.predict", "--workdir", tmp_path / "export", "--dataset", "chexpert", "--root", data_root,
                "--output", tmp_path / "export.csv", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(preds) as a, open(tmp_path / "export.csv") as b:
        run_rows, export_rows = list(csv.DictReader(a)), list(csv.DictReader(b))
    probs = [k for k in run_rows[0] if k.startswith("prob/")]
    assert max(abs(float(a[k]) - float(b[k])) for a, b in zip(run_rows, export_rows) for k in probs) <= 1e-6
