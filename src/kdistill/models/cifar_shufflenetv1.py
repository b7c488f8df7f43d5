"""ShuffleNetV1 for CIFAR (``shufflev1``: 3 groups, stage outputs 240/480/960, blocks 4/8/4)
of the CIFAR-100 benchmark (RepDistiller, mdistiller).

Parameter names and shapes equal the shared RepDistiller/mdistiller CIFAR checkpoints
(``conv1``, ``bn1``, ``layer{s}.{b}.{conv,bn}{1,2,3}``, ``linear``). Out-of-place ReLU/additions.

Stage preset: post = stage output; pre-ReLU = the last block's ``bn3`` output plus its
shortcut (the last block of every stage has stride 1, so the shortcut is the identity and the
pre-activation is a sum); pooled = spatial mean of the ``layer3`` output.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from kdistill.features import model_name, register_stage_preset
from kdistill.models.registry import register_model


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave channel groups: view N×g×(C/g)×H×W, swap the two channel axes, flatten back."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleBottleneck(nn.Module):
    """1×1 group conv - BN - ReLU - shuffle - 3×3 depthwise - BN - ReLU - 1×1 group conv - BN, then
    add the identity (stride 1) or concatenate a 3×3 average-pooled shortcut (stride 2), then ReLU."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid = out_planes // 4
        self.first_groups = 1 if in_planes == 24 else groups  # the stem has 24 channels: no grouping
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        preact = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return torch.relu(preact)


class CifarShuffleNetV1(nn.Module):
    """1×1 stem (24 channels, no stride), three stages, global average pool, linear classifier."""

    def __init__(
        self,
        out_planes: tuple[int, ...] = (240, 480, 960),
        num_blocks: tuple[int, ...] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_planes = 24
        for s, (planes, blocks) in enumerate(zip(out_planes, num_blocks, strict=True), 1):
            # the first block (stride 2) concatenates its input, so its branch makes planes - in_planes
            layers = [ShuffleBottleneck(in_planes, planes - in_planes, 2, groups)]
            layers += [ShuffleBottleneck(planes, planes, 1, groups) for _ in range(1, blocks)]
            self.add_module(f"layer{s}", nn.Sequential(*layers))
            in_planes = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # = avg_pool 4 at 32×32
        self.linear = nn.Linear(out_planes[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(self.avgpool(out), 1))


@register_model("cifar.shufflev1")
def shufflev1(num_classes: int = 100) -> CifarShuffleNetV1:
    """CIFAR ShuffleNetV1, 3 groups (reference ``ShuffleV1``)."""
    return CifarShuffleNetV1(num_classes=num_classes)


@register_stage_preset(lambda m: model_name(m) == "cifar.shufflev1")
def shufflev1_stage_taps(model: nn.Module, preact: bool) -> OrderedDict[str, str]:
    """ShuffleNetV1 stage taps (post-ReLU stage outputs or their pre-ReLU sums)."""
    taps: OrderedDict[str, str] = OrderedDict(stem="bn1!relu")
    for s in (1, 2, 3):
        layer = f"layer{s}"
        last = f"{layer}.{len(model.get_submodule(layer)) - 1}"
        taps[f"stage{s}"] = f"{last}.bn3+{last}.shortcut" if preact else layer
    taps["pooled"] = "avgpool"
    return taps
