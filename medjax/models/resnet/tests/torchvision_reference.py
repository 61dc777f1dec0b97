"""Plain-PyTorch references of torchvision's ResNet, DenseNet and VGG (torchvision itself is not importable here).

Written from torchvision's documented structure with the same module names, so `state_dict()` keys are torchvision's
and the public fixtures' checkpoints load with strict=True; `test_cnn.py` first checks that these references
reproduce the fixtures' arrays, which torchvision 0.28 computed, before using them as the full-size reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv(cin, cout, kernel, stride=1, padding=0, dilation=1, groups=1, bias=False):
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)


# ------------------------------------------------------------------------------------------------ ResNet

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1):
        super().__init__()
        assert groups == 1 and base_width == 64 and dilation == 1
        self.conv1, self.bn1 = _conv(cin, planes, 3, stride, 1), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv(planes, planes, 3, 1, 1), nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1, self.bn1 = _conv(cin, width, 1), nn.BatchNorm2d(width)
        self.conv2 = _conv(width, width, 3, stride, dilation, dilation, groups)  # v1.5: stride on the 3x3
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = _conv(width, planes * 4, 1), nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000, groups=1, width_per_group=64,
                 replace_stride_with_dilation=(False, False, False)):
        super().__init__()
        self.inplanes, self.dilation, self.groups, self.base_width = 64, 1, groups, width_per_group
        self.conv1, self.bn1 = _conv(3, 64, 7, 2, 3), nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._stage(block, 64, layers[0])
        for i, planes in enumerate((128, 256, 512)):
            stage = self._stage(block, planes, layers[i + 1], 2, replace_stride_with_dilation[i])
            setattr(self, f"layer{i + 2}", stage)
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _stage(self, block, planes, n, stride=1, dilate=False):
        previous = self.dilation
        if dilate:
            self.dilation, stride = self.dilation * stride, 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv(self.inplanes, planes * block.expansion, 1, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        blocks = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, previous)]
        self.inplanes = planes * block.expansion
        blocks += [block(self.inplanes, planes, 1, None, self.groups, self.base_width, self.dilation)
                   for _ in range(1, n)]
        return nn.Sequential(*blocks)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        features = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return {"features": features, "logits": self.fc(features), "feature_map": x}


def resnet(block: str, layers, **kw) -> ResNet:
    return ResNet({"BasicBlock": BasicBlock, "Bottleneck": Bottleneck}[block], layers, **kw)


# ------------------------------------------------------------------------------------------------ DenseNet

class _DenseLayer(nn.Module):
    def __init__(self, cin, growth_rate, bn_size):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), _conv(cin, bn_size * growth_rate, 1)
        width = bn_size * growth_rate
        self.norm2, self.conv2 = nn.BatchNorm2d(width), _conv(width, growth_rate, 3, 1, 1)

    def forward(self, features):
        h = self.conv1(F.relu(self.norm1(torch.cat(features, 1))))
        return self.conv2(F.relu(self.norm2(h)))


class _DenseBlock(nn.ModuleDict):
    def __init__(self, n, cin, growth_rate, bn_size):
        super().__init__()
        for i in range(n):
            self[f"denselayer{i + 1}"] = _DenseLayer(cin + i * growth_rate, growth_rate, bn_size)

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm, self.relu, self.conv = nn.BatchNorm2d(cin), nn.ReLU(), _conv(cin, cout, 1)
        self.pool = nn.AvgPool2d(2, 2)


class DenseNet(nn.Module):
    def __init__(self, growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, bn_size=4,
                 num_classes=1000):
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", _conv(3, num_init_features, 7, 2, 3))
        self.features.add_module("norm0", nn.BatchNorm2d(num_init_features))
        self.features.add_module("relu0", nn.ReLU())
        self.features.add_module("pool0", nn.MaxPool2d(3, 2, 1))
        channels = num_init_features
        for i, n in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", _DenseBlock(n, channels, growth_rate, bn_size))
            channels += n * growth_rate
            if i < len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", _Transition(channels, channels // 2))
                channels //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        fmap = F.relu(self.features(x))
        features = torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1)
        return {"features": features, "logits": self.classifier(features), "feature_map": fmap}


def legacy_densenet_keys(state: dict) -> dict:
    """model.state_dict() -> the official files' naming (`norm.1`, `conv.1`, ..., no num_batches_tracked)."""
    import re

    out = {}
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            continue
        out[re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k)] = v
    return out


# ------------------------------------------------------------------------------------------------ VGG

class VGG(nn.Module):
    def __init__(self, cfg, batch_norm=False, num_classes=1000, dropout=0.5, classifier_hidden=4096):
        super().__init__()
        layers, cin = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1)] + ([nn.BatchNorm2d(v)] if batch_norm else []) + [nn.ReLU()]
                cin = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(cin * 49, classifier_hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(classifier_hidden, classifier_hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(classifier_hidden, num_classes))

    def forward(self, x):
        fmap = self.features(x)
        p = torch.flatten(self.avgpool(fmap), 1)
        features = self.classifier[:6](p)
        return {"features": features, "logits": self.classifier[6](features), "feature_map": fmap}


VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
