"""Regenerate tests/fixtures/resnet from upstream torchvision's ResNet; not run in CI (the tests read the fixture).

    python -m medjax.models.resnet.make_fixture OUT_DIR [--torchvision-shim]

The fixture's recipe (its README.md says it in full): `torchvision.models.resnet.ResNet(Bottleneck, **KWARGS)` built
under `torch.manual_seed(3100)`, every floating tensor of its state dict perturbed with
`medjax.models.fixtures.perturb_state_dict_` (seed 3101; BatchNorm statistics too), images `torch.randn(2, 3, 64, 64)`
from generator seed 3102, outputs taken with forward hooks during one `model(images)` in eval mode, float32, CPU.
Writes `checkpoint.pth` (`torch.save(model.state_dict())`, the layout of the official resnet*.pth files),
`config.json`, `images.npy` and `expected.npz`. With torchvision 0.28.0 and torch 2.13.0 (CPU) the checkpoint's
tensors, the images and the outputs equal the committed fixture bit for bit (the outputs with the kernels limited to
AVX2, the default `--cpu avx2`, as on the machine that made them). `--torchvision-shim` lets PyPI's CUDA
build of torchvision import on a CPU-only torch (see `medjax.models.fixtures.torchvision_shim`).
"""

from __future__ import annotations

import sys

import torch

from medjax.models.fixtures import (
    fixture_main,
    hooked,
    import_upstream,
    perturb_state_dict_,
    save_fixture,
    seeded_images,
    versions,
)

SEED = 3100
KWARGS = dict(layers=[1, 1, 1, 1], num_classes=10, zero_init_residual=True, groups=1, width_per_group=8,
              replace_stride_with_dilation=None, norm_layer=None)


def torchvision_fixture(family: str, seed: int, build, entry: str, kwargs: dict, fmt: str, call: str, run):
    """The torchvision families' common steps: `build()` under torch.manual_seed(seed), the perturbation (seed + 1),
    the images (seed + 2) and `run(model, images) -> {name: tensor}` in eval mode under no_grad; returns (the model,
    config.json's dict, images, outputs)."""
    torch.manual_seed(seed)
    model = perturb_state_dict_(build(), seed + 1).eval()
    images = seeded_images((2, 3, 64, 64), seed + 2)
    with torch.no_grad():
        outputs = run(model, images)
    tv = import_upstream(None, "torchvision")
    config = {**kwargs, "family": family, "format": fmt,
              "upstream": {"package": "torchvision", "version": tv.__version__.split("+")[0], "entry": entry,
                           "versions": versions("torchvision")},
              "fixture": {"seed": seed, "perturb_seed": seed + 1, "image_seed": seed + 2,
                          "images_shape": list(images.shape), "call": call, "outputs": list(outputs)}}
    return model, config, images, outputs


def make(out: str) -> None:
    resnet = import_upstream(None, "torchvision.models.resnet")

    def run(model, images):
        got = hooked(model, images, {f"debug_layer{i}": getattr(model, f"layer{i}") for i in range(1, 5)},
                     {"features": model.fc})
        return {k: got[k] for k in ("features", "logits", *(f"debug_layer{i}" for i in range(1, 5)))}

    model, config, images, outputs = torchvision_fixture(
        "resnet", SEED, lambda: resnet.ResNet(resnet.Bottleneck, **KWARGS),
        "torchvision.models.resnet.ResNet(block=torchvision.models.resnet.Bottleneck, **kwargs)",
        {"block": "Bottleneck", **KWARGS},
        "torch.save(model.state_dict()) (.pth, plain OrderedDict[str, Tensor]) like "
        "download.pytorch.org/models/resnet152-*.pth; includes BatchNorm running_mean/running_var/num_batches_tracked; "
        "load_state_dict strict=True",
        "logits = model(images); features = input of model.fc (= flatten(avgpool(layer4(...)))); debug_layerN = output "
        "of model.layerN (forward hooks)", run)
    config["fixture"]["perturbation"] = (
        "see README: additive N(0, 0.5/sqrt(fan_in)) on conv/linear weights, N(0,0.1) on BN weight/bias and other 1-D "
        "tensors, running_mean += N(0,0.1), running_var *= exp(N(0,0.2)), num_batches_tracked untouched")
    save_fixture(out, config, images, outputs, {"checkpoint.pth": model.state_dict()})


def main(argv=None) -> int:
    return fixture_main(make, "resnet", argv)


if __name__ == "__main__":
    sys.exit(main())
