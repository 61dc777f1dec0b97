"""The BatchNorm families in the engine: a few steps of full fine-tuning of a small ResNet match the same steps in
PyTorch (losses, parameters, running statistics); frozen leaves the running statistics bitwise unchanged; each CNN
family trains end to end in the trainer with both heads and every freezing setting.

The fine-tuning comparison uses SGD with momentum (the engine's `optim.name="sgd"`): Adam divides each update by the
gradient's own magnitude, so for the many near-zero gradients of a conv stem it turns float32 rounding noise into
lr-sized differences in either framework; the AdamW recipe itself is checked against PyTorch on DINOv2
(test_training_parity.py). Here what is compared is the BatchNorm network's forward, backward and statistics."""

import json

import jax
import numpy as np
import pytest
import torch

import converters
from medjax import engine, models, optim, pretrained
from medjax.models.resnet.tests.torchvision_reference import resnet
from medjax.schema import make
from medjax.testing import perturb_

STEPS, BATCH, CLASSES, LR, WARMUP, SIZE = 4, 6, 3, 0.05, 2, 32
ARCH = {"block": "Bottleneck", "layers": [1, 1, 1, 1], "width_per_group": 8, "num_classes": 10}


def _torch_steps(model, head, images, labels):
    """The reference loop in train mode: SGD with momentum 0.9, the reference warm-up, clip_grad_norm_."""
    named = [(n, p) for n, p in list(model.named_parameters()) + [("head." + n, p) for n, p in head.named_parameters()]
             if not n.startswith("fc.")]  # the ImageNet fc is not used by the linear head
    opt = torch.optim.SGD([p for _, p in named], lr=LR, momentum=0.9)
    schedule = optim.reference_schedule(LR, WARMUP)
    model.train()
    losses = []
    for step in range(STEPS):
        for g in opt.param_groups:
            g["lr"] = float(schedule(step))
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(model(torch.from_numpy(images[step]))["features"]),
                                                 torch.from_numpy(labels[step]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture
def converted(tmp_path):
    torch.manual_seed(0)
    model = perturb_(resnet(**ARCH), seed=3)
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    (tmp_path / "config.json").write_text(json.dumps(ARCH | {"family": "resnet"}))
    converters.convert(str(tmp_path / "weights.pth"), str(tmp_path / "params"), "resnet", str(tmp_path / "config.json"))
    return model, str(tmp_path / "params")


def _engine(params_dir, freeze):
    config = make({"model.family": "resnet", "model.pretrained": params_dir, "model.freeze": freeze,
                   "image_size": SIZE, "compute_dtype": "float32", "optim.lr": LR, "optim.name": "sgd"})
    return engine.build(config, num_classes=CLASSES, channels=3, task="multiclass", total_steps=STEPS,
                        warmup_steps=WARMUP)


def test_resnet_full_fine_tuning_matches_pytorch(converted):
    model, params_dir = converted
    rng = np.random.default_rng(0)
    images = rng.standard_normal((STEPS, BATCH, 3, SIZE, SIZE)).astype(np.float32)
    labels = rng.integers(0, CLASSES, (STEPS, BATCH))
    head = torch.nn.Linear(model.fc.in_features, CLASSES)
    e = _engine(params_dir, "full")
    params = jax.device_get(e.state.params)
    params["head"] = {"kernel": head.weight.detach().numpy().T.copy(), "bias": head.bias.detach().numpy().copy()}
    state = e.state.replace(params=jax.device_put(params, e.state_sharding.params))
    losses = []
    with jax.default_matmul_precision("float32"):
        for s in range(STEPS):
            batch = {"image": images[s].transpose(0, 2, 3, 1), "label": labels[s].astype(np.int32)}
            state, out = e.train_step(state, batch)
            losses.append(float(out["loss"]))
    ref_losses = _torch_steps(model, head, images, labels.astype(np.int64))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    assert losses[0] != losses[-1]

    # parameters and running statistics: the trained torch model converted again, tensor by tensor
    model.fc.reset_parameters()  # unused by the linear head; its value does not matter for the comparison
    torch.save(model.state_dict(), f"{params_dir}_after.pth")
    converters.convert(f"{params_dir}_after.pth", f"{params_dir}_after", "resnet", f"{params_dir}/../config.json")
    _, expected, _ = models.load_pretrained(f"{params_dir}_after")
    got = {"params": jax.device_get(state.params)["backbone"],
           "batch_stats": jax.device_get(state.model_state)["batch_stats"]["backbone"]}
    checked = 0
    for collection in ("params", "batch_stats"):
        ref_flat, got_flat = pretrained.flatten(expected[collection]), pretrained.flatten(got[collection])
        for path, ref in ref_flat.items():
            if path.startswith("fc/"):
                continue
            scale = max(float(np.abs(ref).max()), 1e-6)
            assert np.abs(np.asarray(got_flat[path]) - ref).max() <= 1e-4 * scale, f"{collection}/{path}"
            checked += 1
    assert checked > 30
    got_head = jax.device_get(state.params)["head"]
    np.testing.assert_allclose(got_head["kernel"], head.weight.detach().numpy().T, rtol=1e-4, atol=1e-6)


def test_frozen_resnet_keeps_running_statistics_bitwise(converted):
    _, params_dir = converted
    e = _engine(params_dir, "frozen")
    before = jax.device_get(e.state.model_state)
    assert e.norms_frozen and all(p.startswith("backbone/") for p in e.norms_frozen)
    state = e.state
    rng = np.random.default_rng(1)
    for _ in range(2):
        batch = {"image": rng.standard_normal((BATCH, SIZE, SIZE, 3)).astype(np.float32),
                 "label": rng.integers(0, CLASSES, BATCH).astype(np.int32)}
        state, out = e.train_step(state, batch)
        assert bool(out["finite"])
    after = jax.device_get(state.model_state)
    leaves = list(zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)))
    assert leaves and all(np.array_equal(a, b) for a, b in leaves)


# ------------------------------------------------------------------------------------------------ end to end

TINY = {
    "resnet": {"block": "basic", "layers": (1, 1, 1, 1), "num_classes": 0, "img_size": 32},
    "densenet": {"growth_rate": 4, "block_config": (1, 2), "num_init_features": 8, "bn_size": 2, "num_classes": 0,
                 "img_size": 32},
    "vgg": {"cfg": (8, "M", 16, "M"), "batch_norm": True, "classifier_hidden": 16, "num_classes": 0, "img_size": 32},
}


@pytest.fixture(scope="module")
def chexpert(tmp_path_factory):
    from medjax.data import fake

    root = str(tmp_path_factory.mktemp("data") / "chexpert")
    fake.write("chexpert", root, 48, seed=0)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("head,freeze", [("attention", "partial"), ("linear", "full"), ("mlp", "frozen")])
def test_cnn_family_trains_end_to_end(tmp_path, chexpert, family, head, freeze):
    from medjax import train

    config = make({"dataset": "chexpert", "data_root": chexpert, "image_size": 32, "compute_dtype": "float32",
                   "model.family": family, "model.architecture": TINY[family], "model.head": head,
                   "model.freeze": freeze, "model.unfreeze_from_block": 0, "model.mlp_hidden": 8,
                   "model.attention_head.width": 16, "model.attention_head.depth": 1,
                   "model.attention_head.num_heads": 2, "model.attention_head.grid": 2,
                   "batch_size": 8, "total_steps": 3, "eval_every": 3, "progress_bar": False,
                   "optim.lr": 1e-3})
    trainer = train.Trainer(config, str(tmp_path / "run"))
    before = jax.device_get(trainer.state)
    result = trainer.run()
    after = jax.device_get(trainer.state)
    assert result["best_step"] == 3 and result["test"]["num_examples"] > 0
    flat_b, flat_a = pretrained.flatten(before.params), pretrained.flatten(after.params)
    moved = {k for k in flat_b if not np.array_equal(flat_b[k], flat_a[k])}
    mask = pretrained.flatten(trainer.engine.trainable)
    assert moved and all(mask[k] for k in moved)  # only trainable parameters moved
    stats_b = pretrained.flatten(before.model_state["batch_stats"])
    stats_a = pretrained.flatten(after.model_state["batch_stats"])
    changed = {k for k in stats_b if not np.array_equal(stats_b[k], stats_a[k])}
    frozen_modules = {p[len("backbone/"):] for p in trainer.engine.norms_frozen}
    assert not any(k.rsplit("/", 1)[0] in frozen_modules for k in changed)  # frozen BatchNorms kept theirs
    if freeze == "frozen":
        assert not changed and not any(k.startswith("backbone/") for k in moved)
    else:
        assert changed


def test_mlp_head_on_dinov2_lc_reads_the_imagenet_logits(tmp_path):
    """The glioma study's model: dinov2_*_lc (backbone + its ImageNet linear classifier) -> Linear(1000, 256) -> ReLU
    -> Linear(256, C); checked against the same composition on the fixture's recorded lc_logits."""
    from medjax import classifier
    from medjax.testing import fixture_path

    converters.convert(fixture_path("dinov2_lc", "checkpoint.pth"), str(tmp_path / "lc"), "dinov2",
                       fixture_path("dinov2_lc", "config.json"),
                       linear_head=fixture_path("dinov2_lc", "linear_head.pth"))
    images = np.load(fixture_path("dinov2_lc", "images.npy"))
    expected = np.load(fixture_path("dinov2_lc", "expected.npz"))["lc_logits"]
    cfg = make({"model.family": "dinov2", "model.pretrained": str(tmp_path / "lc"), "model.head": "mlp",
                "model.mlp_hidden": 16}).model
    model, variables = classifier.build_classifier(cfg, 3, 3, images.shape[-1], jax.random.PRNGKey(0))
    head = variables["params"]["head"]
    with jax.default_matmul_precision("float32"):
        logits = np.asarray(model.apply(variables, images.transpose(0, 2, 3, 1)))
    hidden = np.maximum(expected @ np.asarray(head["fc1"]["kernel"]) + np.asarray(head["fc1"]["bias"]), 0)
    ref = hidden @ np.asarray(head["fc2"]["kernel"]) + np.asarray(head["fc2"]["bias"])
    assert head["fc1"]["kernel"].shape == (expected.shape[1], 16)
    assert np.abs(logits - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
