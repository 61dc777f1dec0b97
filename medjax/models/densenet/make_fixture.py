"""Regenerate tests/fixtures/densenet from upstream torchvision's DenseNet; not run in CI (the tests read the fixture).

    python -m medjax.models.densenet.make_fixture OUT_DIR [--torchvision-shim]

As the ResNet script (`medjax.models.resnet.make_fixture`, whose shared steps this one calls) with
`torchvision.models.densenet.DenseNet(**KWARGS)`, seed 3200. Writes `checkpoint.pth` in the legacy key naming of the
official densenet*.pth files (`denselayerN.norm.1` / `conv.1` / `norm.2` / `conv.2`, no `num_batches_tracked`),
`state_dict/checkpoint.pth` (the same weights as `model.state_dict()`), a `config.json` beside each, `images.npy`
and `expected.npz` (`features`: the classifier's input; `logits`; `debug_features_prerelu`: `model.features`' output,
before DenseNet.forward's ReLU). Reproduces the committed fixture bit for bit (torchvision 0.28.0, torch 2.13.0).
"""

from __future__ import annotations

import os
import re
import sys

from medjax.models.fixtures import fixture_main, hooked, import_upstream, save_fixture, write_json
from medjax.models.resnet.make_fixture import torchvision_fixture

SEED = 3200
KWARGS = dict(growth_rate=8, block_config=[2, 2, 2, 2], num_init_features=16, bn_size=2, drop_rate=0.0,
              num_classes=10, memory_efficient=False)
# the official files' names inside dense layers: norm1 -> norm.1, conv2 -> conv.2 (torchvision's _load_state_dict
# renames them back)
LEGACY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))([12])\.")


def legacy(state: dict) -> dict:
    return {LEGACY.sub(r"\1.\2.", k): v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def make(out: str) -> None:
    densenet = import_upstream(None, "torchvision.models.densenet")

    def run(model, images):
        got = hooked(model, images, {"debug_features_prerelu": model.features}, {"features": model.classifier})
        return {k: got[k] for k in ("features", "logits", "debug_features_prerelu")}

    model, config, images, outputs = torchvision_fixture(
        "densenet", SEED, lambda: densenet.DenseNet(**KWARGS), "torchvision.models.densenet.DenseNet(**kwargs)",
        KWARGS,
        "torch.save of a plain OrderedDict[str, Tensor] (.pth) in the LEGACY key naming of torchvision's official "
        "densenet121/161/169/201 files (denselayerN.norm.1 / relu.1 / conv.1 / norm.2 / conv.2, no "
        "num_batches_tracked); torchvision.models.densenet._load_state_dict renames them to norm1/conv1/norm2/conv2 "
        "and loads strict=True. state_dict/checkpoint.pth = the same weights as model.state_dict() (modern names, "
        "with num_batches_tracked).",
        "logits = model(images); features = input of model.classifier = flatten(adaptive_avg_pool2d(relu("
        "model.features(images)), 1))", run)
    config["fixture"]["other_namings"] = {
        "state_dict/checkpoint.pth": "model.state_dict() (modern torchvision names, includes num_batches_tracked), "
                                     "config state_dict/config.json"}
    state = model.state_dict()
    save_fixture(out, config, images, outputs, {"checkpoint.pth": legacy(state), "state_dict/checkpoint.pth": state})
    write_json(os.path.join(out, "state_dict", "config.json"), config)


def main(argv=None) -> int:
    return fixture_main(make, "densenet", argv)


if __name__ == "__main__":
    sys.exit(main())
