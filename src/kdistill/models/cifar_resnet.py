"""CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4) of the CIFAR-100 benchmark (RepDistiller,
mdistiller).

Parameter names and shapes equal the widely shared RepDistiller/mdistiller CIFAR checkpoints
(``<name>_vanilla/ckpt_epoch_240.pth``), so those load strictly. Activations and residual
additions are out of place so that feature taps see the values of the forward pass
(an in-place op would change a tapped feature after it was recorded).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdistill.models.registry import register_model


class BasicBlock(nn.Module):
    """Post-activation basic block: conv-BN-ReLU-conv-BN, add the shortcut, ReLU."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet for 32×32 inputs: stem, three stages (strides 1, 2, 2), AvgPool 8, FC."""

    def __init__(self, depth: int, num_filters: list[int], num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(num_filters[1], n, 1)
        self.layer2 = self._make_layer(num_filters[2], n, 2)
        self.layer3 = self._make_layer(num_filters[3], n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # = AvgPool 8 at 32×32; also works on other sizes
        self.fc = nn.Linear(num_filters[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _plain(depth: int):
    def factory(num_classes: int = 100) -> CifarResNet:
        return CifarResNet(depth, [16, 16, 32, 64], num_classes)

    factory.__doc__ = f"CIFAR resnet{depth} (16/32/64 channels)."
    return factory


for _depth in (8, 14, 20, 32, 44, 56, 110):
    register_model(f"cifar.resnet{_depth}")(_plain(_depth))


@register_model("cifar.resnet8x4")
def resnet8x4(num_classes: int = 100) -> CifarResNet:
    """CIFAR resnet8 with 4× wider stages (64/128/256)."""
    return CifarResNet(8, [32, 64, 128, 256], num_classes)


@register_model("cifar.resnet32x4")
def resnet32x4(num_classes: int = 100) -> CifarResNet:
    """CIFAR resnet32 with 4× wider stages (64/128/256)."""
    return CifarResNet(32, [32, 64, 128, 256], num_classes)
