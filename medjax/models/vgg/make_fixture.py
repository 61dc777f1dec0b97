"""Regenerate tests/fixtures/vgg from upstream torchvision's VGG; not run in CI (the tests read the fixture).

    python -m medjax.models.vgg.make_fixture OUT_DIR [--torchvision-shim]

As the ResNet script (`medjax.models.resnet.make_fixture`, whose shared steps this one calls) with
`torchvision.models.vgg.VGG(make_layers(CFG), 10, init_weights=True, dropout=0.5)`, seed 3300, whose 4096-wide
classifier is then replaced, from the same global RNG, by one of hidden width 64 with the official key names
(`classifier.0/3/6`), initialised as VGG.__init__ does (normal(0, 0.01), bias 0). Writes `checkpoint.pth`
(`torch.save(model.state_dict())`), `config.json`, `images.npy` and `expected.npz` (`features`: the output of
`classifier[:6]`, the penultimate feature; `logits`; `debug_pool`: the classifier's input). Reproduces the committed
fixture bit for bit (torchvision 0.28.0, torch 2.13.0; `--cpu avx2`, see the ResNet script).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from medjax.models.fixtures import fixture_main, import_upstream, save_fixture
from medjax.models.resnet.make_fixture import torchvision_fixture

SEED = 3300
KWARGS = dict(cfg=[8, "M", 16, "M", 32, 32, "M", 32, "M", 32, "M"], batch_norm=False, num_classes=10,
              init_weights=True, dropout=0.5, classifier_hidden=64)


def build(vgg):
    kw = KWARGS
    model = vgg.VGG(vgg.make_layers(kw["cfg"], kw["batch_norm"]), kw["num_classes"], kw["init_weights"], kw["dropout"])
    hidden, channels = kw["classifier_hidden"], [c for c in kw["cfg"] if c != "M"][-1]
    model.classifier = nn.Sequential(
        nn.Linear(channels * 7 * 7, hidden), nn.ReLU(True), nn.Dropout(kw["dropout"]), nn.Linear(hidden, hidden),
        nn.ReLU(True), nn.Dropout(kw["dropout"]), nn.Linear(hidden, kw["num_classes"]))
    for m in model.classifier:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.constant_(m.bias, 0)
    return model


def run(model, images):
    pool = torch.flatten(model.avgpool(model.features(images)), 1)
    features = model.classifier[:6](pool)
    return {"features": features, "logits": model.classifier[6](features), "debug_pool": pool}


def make(out: str) -> None:
    vgg = import_upstream(None, "torchvision.models.vgg")
    model, config, images, outputs = torchvision_fixture(
        "vgg", SEED, lambda: build(vgg),
        "m = torchvision.models.vgg.VGG(torchvision.models.vgg.make_layers(cfg, batch_norm), num_classes, "
        "init_weights=True, dropout=0.5); m.classifier = nn.Sequential(Linear(C*7*7, classifier_hidden), ReLU(True), "
        "Dropout(0.5), Linear(classifier_hidden, classifier_hidden), ReLU(True), Dropout(0.5), "
        "Linear(classifier_hidden, num_classes))", KWARGS,
        "torch.save(model.state_dict()) (.pth, plain OrderedDict[str, Tensor]) like "
        "download.pytorch.org/models/vgg19-dcbb9e9d.pth; load_state_dict strict=True. classifier shrunk to hidden "
        "width 64 (keys classifier.0/3/6 as upstream)",
        "p = flatten(model.avgpool(model.features(x)), 1); features = model.classifier[:6](p); logits = "
        "model.classifier[6](features) (== model(x))", run)
    save_fixture(out, config, images, outputs, {"checkpoint.pth": model.state_dict()})


def main(argv=None) -> int:
    return fixture_main(make, "vgg", argv)


if __name__ == "__main__":
    sys.exit(main())
