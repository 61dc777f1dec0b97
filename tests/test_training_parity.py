"""10 steps of the reference recipe in medjax's train step vs the same loop in PyTorch with transformers' Dinov2Model:
AdamW (decay on ndim > 1 only), the reference warm-up, global-norm clipping 1.0, a linear head on the normed CLS, CE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import converters
from medjax import engine, models, optim, pretrained
from medjax.schema import make
from medjax.testing import perturb_

transformers = pytest.importorskip("transformers")

STEPS, BATCH, CLASSES, LR, WARMUP = 10, 4, 3, 1e-3, 4


def _torch_run(model, head, images, labels, frozen):
    """The reference loop: AdamW param groups as the study builds them, lr set per iteration, clip_grad_norm_."""
    for p in model.parameters():
        p.requires_grad_(not frozen)
    named = [(n, p) for n, p in list(model.named_parameters()) + [("head." + n, p) for n, p in head.named_parameters()]
             if p.requires_grad]
    groups = [{"params": [p for n, p in named if not (n.endswith(".bias") or p.ndim == 1)]},
              {"params": [p for n, p in named if n.endswith(".bias") or p.ndim == 1], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    schedule = optim.reference_schedule(LR, WARMUP)
    losses = []
    for step in range(STEPS):
        for g in opt.param_groups:
            g["lr"] = float(schedule(step))
        opt.zero_grad()
        cls = model(torch.from_numpy(images[step])).pooler_output  # the final-normed CLS token
        loss = torch.nn.functional.cross_entropy(head(cls), torch.from_numpy(labels[step]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("freeze", ["frozen", "full"])
def test_ten_steps_match_pytorch(tmp_path, freeze):
    torch.manual_seed(0)
    # qkv_bias=False: the key bias has an exactly zero gradient (softmax ignores a per-query constant), so Adam
    # turns float rounding noise into full-size updates of it in both frameworks, differently.
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14,
                                       image_size=56, qkv_bias=False)
    model = perturb_(transformers.Dinov2Model(config), seed=10).eval()
    head = torch.nn.Linear(32, CLASSES)
    model.save_pretrained(tmp_path / "hf")
    converters.convert(str(tmp_path / "hf"), str(tmp_path / "jx"), "dinov2")
    rng = np.random.default_rng(0)
    images = rng.standard_normal((STEPS, BATCH, 3, 56, 56)).astype(np.float32)
    labels = rng.integers(0, CLASSES, (STEPS, BATCH))

    # medjax: the trainer's own build path
    config = make({"model.family": "dinov2", "model.pretrained": str(tmp_path / "jx"), "model.freeze": freeze,
                   "image_size": 56, "compute_dtype": "float32", "optim.lr": LR, "optim.weight_decay": 0.05})
    e = engine.build(config, num_classes=CLASSES, channels=3, task="multiclass", total_steps=STEPS,
                     warmup_steps=WARMUP)
    params = jax.device_get(e.state.params)
    params["head"] = {"kernel": head.weight.detach().numpy().T.copy(), "bias": head.bias.detach().numpy().copy()}
    state, step_fn = e.state.replace(params=jax.device_put(params, e.state_sharding.params)), e.train_step
    jax_losses = []
    with jax.default_matmul_precision("float32"):
        for s in range(STEPS):
            batch = {"image": jnp.asarray(images[s].transpose(0, 2, 3, 1)), "label": jnp.asarray(labels[s], jnp.int32)}
            state, out = step_fn(state, batch)
            jax_losses.append(float(out["loss"]))

    torch_losses = _torch_run(model, head, images, labels.astype(np.int64), frozen=freeze == "frozen")
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=1e-4)
    assert jax_losses[0] != jax_losses[-1]

    # final parameters: the trained PyTorch backbone converted again, tensor by tensor
    model.save_pretrained(tmp_path / "hf_after")
    converters.convert(str(tmp_path / "hf_after"), str(tmp_path / "jx_after"), "dinov2")
    _, expected_backbone_vars, _ = models.load_pretrained(str(tmp_path / "jx_after"))
    expected_backbone = expected_backbone_vars["params"]
    expected = {"backbone": expected_backbone,
                "head": {"kernel": head.weight.detach().numpy().T, "bias": head.bias.detach().numpy()}}
    got = pretrained.flatten(jax.device_get(state.params))
    moved = 0
    for path, ref in pretrained.flatten(expected).items():
        scale = max(np.abs(ref).max(), 1e-6)
        assert np.abs(np.asarray(got[path]) - ref).max() <= 1e-4 * scale, path
        moved += not np.array_equal(np.asarray(got[path]), pretrained.flatten(params)[path])
    if freeze == "frozen":
        for path, value in pretrained.flatten(params["backbone"]).items():
            assert np.array_equal(np.asarray(got["backbone/" + path]), value), f"frozen {path} moved"
        assert moved == 2  # only the head
    else:
        assert moved == len(got)
