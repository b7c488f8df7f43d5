"""MobileNetV2 for CIFAR (``mobile_half``: expansion T=6, width 0.5), as defined by RepDistiller
(Tian et al., ICLR 2020) and mdistiller for the CIFAR-100 benchmark.

Parameter names and shapes equal the shared RepDistiller/mdistiller CIFAR checkpoints
(``conv1``, ``blocks.{g}.{b}.conv.{0,1,3,4,6,7}``, ``conv2``, ``classifier.0``). Plain ReLU (not
ReLU6), out of place. Unlike the reference, the constructor prints nothing, and the
final pool is adaptive (identical to the reference AvgPool at 32×32, and valid at other sizes).

Stage features are the linear-bottleneck outputs of groups 1, 2, 4 and 6; they are never
ReLU'd, so the pre-ReLU preset equals the post-ReLU one.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor, nn

from kdistill.features import model_name, register_stage_preset
from kdistill.models.registry import register_model

# (output channels before width scaling, repeats, first stride); the first group has expansion 1
_SETTINGS = ((16, 1, 1), (24, 2, 1), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1))


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class InvertedResidual(nn.Module):
    """1×1 expand (kept even for t=1) - BN - ReLU - 3×3 depthwise - BN - ReLU - 1×1 project - BN;
    residual add iff stride 1 and equal widths."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        self.use_residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class CifarMobileNetV2(nn.Module):
    """Stem (3×3, stride 2), seven inverted-residual groups, 1×1 conv to 1280, pool, classifier."""

    def __init__(self, expansion: int = 6, width_mult: float = 0.5, num_classes: int = 100):
        super().__init__()
        channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, channels, 3, 2)
        self.blocks = nn.ModuleList()
        for index, (c, n, s) in enumerate(_SETTINGS):
            t = 1 if index == 0 else expansion
            cout = int(c * width_mult)
            group = []
            for stride in [s] + [1] * (n - 1):
                group.append(InvertedResidual(channels, cout, stride, t))
                channels = cout
            self.blocks.append(nn.Sequential(*group))
        last_channels = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(channels, last_channels, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last_channels, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for group in self.blocks:
            x = group(x)
        x = self.avgpool(self.conv2(x))
        return self.classifier(torch.flatten(x, 1))


@register_model("cifar.mobile_half")
def mobile_half(num_classes: int = 100) -> CifarMobileNetV2:
    """CIFAR MobileNetV2, T=6, width 0.5 (reference ``MobileNetV2`` / ``mobile_half``)."""
    return CifarMobileNetV2(6, 0.5, num_classes)


@register_stage_preset(lambda m: model_name(m) == "cifar.mobile_half")
def mobilenetv2_stage_taps(model: nn.Module, preact: bool) -> OrderedDict[str, str]:
    """MobileNetV2 stage taps: linear group outputs 1, 2, 4, 6; ``preact`` changes nothing."""
    taps: OrderedDict[str, str] = OrderedDict(stem="conv1")
    for i, group in enumerate((1, 2, 4, 6), 1):
        taps[f"stage{i}"] = f"blocks.{group}"
    taps["pooled"] = "avgpool"
    return taps
