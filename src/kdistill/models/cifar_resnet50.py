"""ResNet50 for CIFAR (``resnet50``: reference ``ResNet50`` of RepDistiller's ``models/resnetv2.py``).

Parameter names and shapes equal the shared RepDistiller/mdistiller CIFAR checkpoints; note the
projection is called ``shortcut`` (not ``downsample``) and is an empty ``nn.Sequential`` for
identity shortcuts. Out-of-place ReLU and residual additions (an in-place op would change a
tapped feature after it was recorded).

Stage preset: post = stage output; pre-ReLU = the last block's ``bn3`` output plus its
``shortcut`` output (the block input when the shortcut is empty); pooled = ``avgpool`` output.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from kdistill.features import model_name, register_stage_preset
from kdistill.models.registry import register_model


class Bottleneck(nn.Module):
    """1×1 - BN - ReLU - 3×3(stride) - BN - ReLU - 1×1 (×4) - BN; add the shortcut; ReLU."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet50(nn.Module):
    """3×3 stem (64, stride 1, no max-pool), bottleneck stages [3, 4, 6, 3] (strides 1, 2, 2, 2),
    global average pool, linear classifier."""

    def __init__(self, num_blocks: tuple[int, ...] = (3, 4, 6, 3), num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        for s, (planes, blocks, stride) in enumerate(zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2), strict=True), 1):
            layers = []
            for b in range(blocks):
                layers.append(Bottleneck(in_planes, planes, stride if b == 0 else 1))
                in_planes = planes * Bottleneck.expansion
            self.add_module(f"layer{s}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.avgpool(out), 1))


@register_model("cifar.resnet50")
def resnet50(num_classes: int = 100) -> CifarResNet50:
    """CIFAR ResNet50 (reference ``ResNet50`` in ``resnetv2.py``)."""
    return CifarResNet50(num_classes=num_classes)


@register_stage_preset(lambda m: model_name(m) == "cifar.resnet50")
def resnet50_stage_taps(model: nn.Module, preact: bool) -> OrderedDict[str, str]:
    """CIFAR ResNet50 stage taps: pre-ReLU = last block's ``bn3`` + ``shortcut``."""
    taps: OrderedDict[str, str] = OrderedDict(stem="bn1!relu")
    for s in (1, 2, 3, 4):
        layer = f"layer{s}"
        last = f"{layer}.{len(model.get_submodule(layer)) - 1}"
        taps[f"stage{s}"] = f"{last}.bn3+{last}.shortcut" if preact else layer
    taps["pooled"] = "avgpool"
    return taps
