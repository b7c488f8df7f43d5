"""VGG with BatchNorm for CIFAR (vgg8, vgg11, vgg13, vgg16, vgg19) of the CIFAR-100 benchmark (RepDistiller,
mdistiller).

Parameter names and shapes equal the shared RepDistiller/mdistiller CIFAR checkpoints
(``block{i}.{3m}`` conv with bias, ``block{i}.{3m+1}`` BN, ``classifier``). Each block ends in its
last BN (its final ReLU is applied outside, functionally), so the block output is the pre-ReLU
feature and ``block{i}!relu`` the post-ReLU one.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor, nn

from kdistill.features import model_name, register_stage_preset
from kdistill.models.registry import register_model

_CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _make_block(widths: list[int], in_channels: int) -> nn.Sequential:
    """conv(bias)-BN-ReLU per width, without the block's last ReLU."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class CifarVGG(nn.Module):
    """Five conv blocks; max-pool after blocks 0-2 (and after block 3 only for 64×64 inputs, as in
    the reference); global average pool; one linear classifier."""

    def __init__(self, config: list[list[int]], num_classes: int = 100):
        super().__init__()
        in_channels = [3] + [widths[-1] for widths in config[:-1]]
        for i, (widths, cin) in enumerate(zip(config, in_channels, strict=True)):
            self.add_module(f"block{i}", _make_block(widths, cin))
        for i in range(4):
            self.add_module(f"pool{i}", nn.MaxPool2d(kernel_size=2, stride=2))
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        height = x.shape[2]
        x = self.pool0(torch.relu(self.block0(x)))
        x = self.pool1(torch.relu(self.block1(x)))
        x = self.pool2(torch.relu(self.block2(x)))
        x = torch.relu(self.block3(x))
        if height == 64:
            x = self.pool3(x)
        x = torch.relu(self.block4(x))
        return self.classifier(torch.flatten(self.pool4(x), 1))


def _vgg(name: str):
    def factory(num_classes: int = 100) -> CifarVGG:
        return CifarVGG(_CONFIGS[name], num_classes)

    factory.__doc__ = f"CIFAR {name} with BatchNorm (reference constructor {name}_bn of the CIFAR-100 benchmark)."
    return factory


for _name in _CONFIGS:
    register_model(f"cifar.{_name}")(_vgg(_name))


@register_stage_preset(lambda m: model_name(m).startswith("cifar.vgg"))
def vgg_stage_taps(model: nn.Module, preact: bool) -> OrderedDict[str, str]:
    """VGG stage taps: stem = ReLU(block0); stage i = block i (pre) or its ReLU (post)."""
    suffix = "" if preact else "!relu"
    taps: OrderedDict[str, str] = OrderedDict(stem="block0!relu")
    for i in range(1, 5):
        taps[f"stage{i}"] = f"block{i}{suffix}"
    taps["pooled"] = "pool4"
    return taps
