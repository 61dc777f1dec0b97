"""benchmarks/cpu_profile.py's attribution of XLA:CPU kernels to the parts of the train step (issue 24, item 7): every
kernel of a small ViT's compiled step lands in the category its HLO instruction belongs to. No timing here."""

import collections
import re
import sys

import jax
import numpy as np

from medjax import engine
from medjax.models.vit import ViTConfig
from medjax.schema import make
from medjax.testing import ROOT

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # benchmarks/ is not an installed package
from benchmarks import cpu_profile  # noqa: E402

TINY = ViTConfig(family="mae", width=32, depth=2, num_heads=2, patch_size=8, pos_grid=(2, 2), mlp_hidden=64)


def compiled_step_hlo():
    e = engine.build(make({"model.family": "mae", "model.architecture": TINY.to_dict(), "model.freeze": "full",
                           "compute_dtype": "float32", "image_size": 16, "optim.lr": 1e-3,
                           "optim.schedule": "constant"}), num_classes=3, channels=3, task="multiclass",
                     total_steps=4)
    rng = np.random.default_rng(0)
    batch = {"image": jax.numpy.asarray(rng.standard_normal((4, 16, 16, 3)), jax.numpy.float32),
             "label": jax.numpy.asarray(rng.integers(0, 3, 4), jax.numpy.int32)}
    return e.train_step.lower(e.state, batch).compile().as_text()


def test_every_kernel_of_the_step_lands_in_its_category():
    hlo = compiled_step_hlo()
    instructions = cpu_profile.hlo_instructions(hlo)
    entry = hlo[hlo.index("ENTRY"):]
    kernels = [m.group(1) for m in re.finditer(r"^\s+(?:ROOT )?%(\S+) = \S+ (?:fusion|dot|copy|convolution)\(",
                                               entry, re.M)]
    assert kernels
    by = collections.defaultdict(list)
    for k in kernels:
        by[cpu_profile.xla_category(*instructions[k])].append(k)
    matmul, attention, norm, gelu, _, optimizer = cpu_profile.CATEGORIES[:6]
    # the dense layers' products (forward, both gradients) of both blocks are matmuls; none is counted as attention
    for block in range(TINY.depth):
        for layer in ("attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2"):
            ops = [instructions[k][1] for k in by[matmul]]
            assert sum(f"blocks_{block}/{layer}/" in op for op in ops) >= 2, (block, layer)
    # the attention core: QK^T and AV (batched dots over batch and heads), forward and backward
    assert any("bnqh,bnkh->bnqk" in instructions[k][1] for k in by[attention])
    assert any("bnqk,bnkh->bnqh" in instructions[k][1] for k in by[attention])
    assert not any(re.search(r"/attn/(qkv|proj)/", instructions[k][1]) for k in by[attention])
    assert any("/norm1/" in instructions[k][1] for k in by[norm])
    assert any("/mlp/erf" in instructions[k][1] for k in by[gelu])
    # the optimizer update and the NaN guard sit outside the model: no flax module path
    assert by[optimizer] and not any("Classifier" in instructions[k][1] for k in by[optimizer])
    assert any("select_n" in instructions[k][1] for k in by[optimizer])


def test_pytorch_operators_land_in_the_same_categories():
    matmul, attention, norm, gelu, other = cpu_profile.CATEGORIES[:5]
    assert cpu_profile.torch_category("aten::addmm") == matmul
    assert cpu_profile.torch_category("aten::mm") == matmul
    assert cpu_profile.torch_category("aten::convolution_backward") == matmul
    assert cpu_profile.torch_category("aten::_scaled_dot_product_flash_attention_for_cpu") == attention
    assert cpu_profile.torch_category("aten::native_layer_norm_backward") == norm
    assert cpu_profile.torch_category("aten::gelu_backward") == gelu
    assert cpu_profile.torch_category("aten::add_") == other
