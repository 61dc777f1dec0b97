"""The engine contract: per-family network order for partial freezing and layer decay, BatchNorm with PyTorch's
semantics (train / eval / frozen), and the locked config surface."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from medjax import models, rules
from medjax.models.hiera import HieraConfig
from medjax.models.layers import BatchNorm, frozen_norms
from medjax.models.vit import ViTConfig
from medjax.models.vmamba import VMambaConfig
from medjax.pretrained import flatten
from medjax.schema import make
from medjax.testing import ROOT

VMAMBA = VMambaConfig(dims=(8, 16, 32, 64), depths=(1, 2, 2, 1), img_size=64)


def _classifier_paths(config) -> dict:
    """{path: shape} of a classifier tree: the backbone's parameters under backbone/, and a head."""
    flat = {f"backbone/{k}": v.shape for k, v in flatten(models.param_shapes(config)).items()}
    return flat | {"head/kernel": (8, 2), "head/bias": (2,)}


def _mask(config, freeze, k):
    tree = {}
    for path, shape in _classifier_paths(config).items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = np.zeros(shape)
    cfg = make({"model.freeze": freeze, "model.unfreeze_from_block": k}).model
    return flatten(rules.trainable_mask(tree, rules.trainable_rules(cfg, models.family(config.family), config))), tree


def test_vmamba_partial_freezing_follows_network_order_across_stages():
    """Blocks restart their numbering in every VMamba stage (layers_s/blocks_j); "from block 2" means the third
    block the input meets (layers_1/blocks_1), not every blocks_2 of every stage."""
    mask, _ = _mask(VMAMBA, "partial", 2)
    order = ["layers_0/blocks_0", "layers_1/blocks_0", "layers_1/blocks_1", "layers_2/blocks_0", "layers_2/blocks_1",
             "layers_3/blocks_0"]
    for i, block in enumerate(order):
        paths = [k for k in mask if k.startswith(f"backbone/{block}/")]
        assert paths, block
        assert all(mask[k] == (i >= 2) for k in paths), block
    assert not any(v for k, v in mask.items() if k.startswith("backbone/patch_embed/"))
    # stage 0's downsample feeds layers_1/blocks_0 (frozen); stage 1's feeds layers_2/blocks_0 (trained)
    assert not any(v for k, v in mask.items() if k.startswith("backbone/layers_0/downsample_"))
    assert all(v for k, v in mask.items() if k.startswith("backbone/layers_1/downsample_"))
    assert mask["backbone/classifier_norm/scale"] and mask["head/kernel"]


@pytest.mark.parametrize("config", [
    VMAMBA,
    ViTConfig("dinov2", 16, 3, 2, 8, (2, 2), 32),
    HieraConfig(family="sam2_hiera", embed_dims=(8, 16, 32, 64), num_heads=(1, 1, 1, 1), stages=(1, 2, 1, 1),
                window_spec=(2, 2, 2, 2), global_att_blocks=(2,), pos_embed_bkg=(2, 2), d_model=8),
], ids=["vmamba", "vit", "hiera"])
def test_layer_decay_gives_each_block_its_network_depth(config):
    family = models.family(config.family)
    _, tree = _mask(config, "full", 0)
    lr_rules = rules.lr_scale_rules(make({"optim.layer_decay": 0.5}).optim, family, config)
    scales = flatten(rules.lr_scales(tree, lr_rules))
    patterns = family.layer_patterns(config)
    depth = len(patterns) - 1
    for path, scale in scales.items():
        if not path.startswith("backbone/"):
            assert scale == 1.0, path
            continue
        layer = family.layer_of(config, path[len("backbone/"):], patterns)
        assert scale == 0.5 ** (depth + 1 - layer), path
    # every block has its own depth: as many distinct scales as embeddings + blocks + after
    assert len({s for p, s in scales.items() if p.startswith("backbone/")}) == depth + 2
    if config.family == "vmamba":  # the 2nd block of stage 1 is the 3rd block: depth 3, not 2
        assert scales["backbone/layers_1/blocks_1/mlp/fc1/kernel"] == 0.5 ** (depth + 1 - 3)
        assert scales["backbone/layers_2/blocks_1/mlp/fc1/kernel"] == 0.5 ** (depth + 1 - 5)


# ------------------------------------------------------------------------------------------------ BatchNorm


class _Net:
    """conv -> BN -> ReLU in torch and flax with the same (perturbed) weights."""

    def __init__(self, seed=0):
        torch.manual_seed(seed)
        self.torch = torch.nn.BatchNorm2d(5)
        with torch.no_grad():
            self.torch.weight.add_(torch.randn(5) * 0.3)
            self.torch.bias.add_(torch.randn(5) * 0.3)
            self.torch.running_mean.add_(torch.randn(5))
            self.torch.running_var.mul_(torch.rand(5) + 0.5)
        self.variables = {
            "params": {"bn": {"scale": jnp.asarray(self.torch.weight.detach().numpy()),
                              "bias": jnp.asarray(self.torch.bias.detach().numpy())}},
            "batch_stats": {"bn": {"mean": jnp.asarray(self.torch.running_mean.numpy()),
                                   "var": jnp.asarray(self.torch.running_var.numpy())}}}


class _Module(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return BatchNorm(name="bn")(x, train)


def test_batchnorm_train_and_eval_match_torch():
    net, module = _Net(), _Module()
    variables = net.variables
    rng = np.random.default_rng(0)
    net.torch.train()
    for step in range(4):  # running statistics after several steps: momentum 0.1, unbiased running variance
        x = rng.standard_normal((6, 3, 4, 5)).astype(np.float32) * 2 + 1
        ref = net.torch(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
        out, updates = module.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
        variables = {"params": variables["params"], **updates}
        assert np.abs(np.asarray(out) - ref).max() <= 1e-6, step
        np.testing.assert_allclose(variables["batch_stats"]["bn"]["mean"], net.torch.running_mean.numpy(), atol=1e-6)
        np.testing.assert_allclose(variables["batch_stats"]["bn"]["var"], net.torch.running_var.numpy(), atol=1e-6)
    net.torch.eval()
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    ref = net.torch(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
    assert np.abs(np.asarray(module.apply(variables, jnp.asarray(x))) - ref).max() <= 1e-6


def test_frozen_batchnorm_uses_and_keeps_its_statistics():
    net, module = _Net(1), _Module()
    x = jnp.asarray(np.random.default_rng(1).standard_normal((6, 3, 4, 5)).astype(np.float32))
    with frozen_norms({"bn"}):
        out, updates = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))(net.variables, x)
    for k in ("mean", "var"):
        assert np.array_equal(np.asarray(updates["batch_stats"]["bn"][k]),
                              np.asarray(net.variables["batch_stats"]["bn"][k]))
    net.torch.eval()  # a frozen BatchNorm normalises with the stored statistics, as torch in eval mode
    ref = net.torch(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
    assert np.abs(np.asarray(out) - ref).max() <= 1e-6


# ------------------------------------------------------------------------------------------------ config surface


def _main(*args):
    return subprocess.run([sys.executable, "-m", "medjax.main", "--config=configs/demo.py", *args], cwd=ROOT,
                          capture_output=True, text=True)


def test_unknown_config_field_is_one_line_naming_the_closest(tmp_path):
    proc = _main(f"--workdir={tmp_path}", "--config.model.freze=full")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "model.freze" in lines[0] and "model.freeze" in lines[0]
    assert not os.listdir(tmp_path)


def test_value_outside_allowed_set_is_one_line_listing_them(tmp_path):
    proc = _main(f"--workdir={tmp_path}", "--config.compute_dtype=float16")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "compute_dtype" in lines[0] and "float32" in lines[0] and "bfloat16" in lines[0]
    assert not os.listdir(tmp_path)


def test_vit_execution_contract_converts_between_layouts():
    """Family.execution: scan=True stacks the converted blocks, scan=False unrolls a scanned model's (export and
    predict use this); families without the options refuse them."""
    config = ViTConfig("dinov2", 16, 3, 2, 8, (2, 2), 32)
    family = models.family("dinov2")
    variables = {"params": jax.tree_util.tree_map(lambda s: np.random.default_rng(0).standard_normal(s.shape),
                                                  models.param_shapes(config))}
    scanned_cfg, scanned = family.execution(config, variables, False, True)
    assert scanned_cfg.scan and "blocks" in scanned["params"] and "blocks_0" not in scanned["params"]
    plain_cfg, plain = family.execution(scanned_cfg, scanned, False, False)
    assert not plain_cfg.scan and flatten(plain["params"]).keys() == flatten(variables["params"]).keys()
    assert all(np.array_equal(a, flatten(variables["params"])[k]) for k, a in flatten(plain["params"]).items())
    assert models.family("vmamba").execution is None
