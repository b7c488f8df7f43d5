"""Wide ResNets for CIFAR (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2) of the CIFAR-100 benchmark
(RepDistiller, mdistiller).

Pre-activation blocks; parameter names and shapes equal the shared RepDistiller/mdistiller CIFAR
checkpoints (``block{g}.layer.{b}.*``, ``convShortcut``). Activations and additions are out of
place so feature taps see the values before any later in-place change.

Stage preset: post features are the raw group outputs (residual sums, no BN/ReLU);
pre-ReLU features are the outputs of the BN layers the normal forward already applies to those
group outputs (``block2.layer.0.bn1``, ``block3.layer.0.bn1``, top-level ``bn1``), so no BN runs
twice and running statistics are updated once (the reference applies those BNs a second time to get
them, updating the statistics twice in training mode).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdistill.features import model_name, register_stage_preset
from kdistill.models.registry import register_model


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv; identity shortcut on the raw input, or a 1×1 projection of the
    activated input when the width changes (the residual branch then also starts from it)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = (
            None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(activated)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return shortcut + out


class NetworkBlock(nn.Module):
    """One group of ``n`` wide blocks, kept under ``.layer`` for the reference key names."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(
            *(
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(n)
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k: 3×3 stem conv (no BN/ReLU), three groups (strides 1, 2, 2), BN-ReLU, pool, FC."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100, drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"Wide ResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # = AvgPool 8 at 32×32
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return self.fc(torch.flatten(self.avgpool(out), 1))


def _wrn(depth: int, widen_factor: int):
    def factory(num_classes: int = 100, drop_rate: float = 0.0) -> WideResNet:
        return WideResNet(depth, widen_factor, num_classes, drop_rate)

    factory.__doc__ = f"CIFAR Wide ResNet {depth}-{widen_factor} (CIFAR-100 benchmark definition)."
    return factory


for _depth, _k in ((16, 1), (16, 2), (40, 1), (40, 2)):
    register_model(f"cifar.wrn_{_depth}_{_k}")(_wrn(_depth, _k))


@register_stage_preset(lambda m: model_name(m).startswith("cifar.wrn_"))
def wrn_stage_taps(model: nn.Module, preact: bool) -> OrderedDict[str, str]:
    """WRN stage taps: stem = raw conv output; pre-ReLU = the next BN's output (no extra BN call)."""
    taps: OrderedDict[str, str] = OrderedDict(stem="conv1")
    if preact:
        taps.update(stage1="block2.layer.0.bn1", stage2="block3.layer.0.bn1", stage3="bn1")
    else:
        taps.update(stage1="block1", stage2="block2", stage3="block3")
    taps["pooled"] = "avgpool"
    return taps
