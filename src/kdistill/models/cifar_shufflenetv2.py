"""ShuffleNetV2 for CIFAR (``shufflev2``: net size 1, stages 116/232/464, basic blocks 3/7/3,
head 1024) of the CIFAR-100 benchmark (RepDistiller, mdistiller).

Parameter names and shapes equal the shared RepDistiller/mdistiller CIFAR checkpoints
(``conv1``, ``bn1``, ``layer{s}.0.{conv,bn}{1..5}`` down blocks, ``layer{s}.{b}.{conv,bn}{1..3}``
basic blocks, ``conv2``, ``bn2``, ``linear``). Out-of-place ReLU.

Stage preset: post = stage output; pre-ReLU = concat[first half of the last block's input,
its ``bn3`` output], **not** channel-shuffled (kept for compatibility with the reference). That tensor
has no module of its own in the reference, so each basic block passes it through a parameter-free
``preact`` marker (``nn.Identity``) to make it tappable; pooled = spatial mean of ReLU(``bn2``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from kdistill.features import model_name, register_stage_preset
from kdistill.models.cifar_shufflenetv1 import channel_shuffle
from kdistill.models.registry import register_model


def _pointwise(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, bias=False)


def _depthwise(channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False)


class ShuffleV2Block(nn.Module):
    """Split channels in halves (x1, x2); x2 → 1×1-BN-ReLU → 3×3 depthwise-BN → 1×1-BN-ReLU;
    concat [x1, branch]; shuffle (2 groups)."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = _pointwise(half, half)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = _depthwise(half, 1)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = _pointwise(half, half)
        self.bn3 = nn.BatchNorm2d(half)
        self.preact = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        half = x.shape[1] // 2
        x1, x2 = x[:, :half], x[:, half:]
        out = torch.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = self.bn3(self.conv3(out))
        self.preact(torch.cat([x1, out], 1))  # tap point only; the result is not used further
        return channel_shuffle(torch.cat([x1, torch.relu(out)], 1), 2)


class ShuffleV2DownBlock(nn.Module):
    """Stride-2 block: left = 3×3 depthwise s2-BN-1×1-BN-ReLU; right = 1×1-BN-ReLU-3×3 depthwise
    s2-BN-1×1-BN-ReLU; concat [left, right]; shuffle (2 groups)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        self.conv1 = _depthwise(cin, 2)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv2 = _pointwise(cin, mid)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = _pointwise(cin, mid)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = _depthwise(mid, 2)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = _pointwise(mid, mid)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = torch.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = torch.relu(self.bn3(self.conv3(x)))
        right = torch.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class CifarShuffleNetV2(nn.Module):
    """1×1 stem (24 channels, no stride), three stages, 1×1 conv head, global pool, classifier."""

    def __init__(
        self,
        out_channels: tuple[int, ...] = (116, 232, 464, 1024),
        num_blocks: tuple[int, ...] = (3, 7, 3),
        num_classes: int = 100,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cin = 24
        for s, (cout, blocks) in enumerate(zip(out_channels[:3], num_blocks, strict=True), 1):
            layers = [ShuffleV2DownBlock(cin, cout)] + [ShuffleV2Block(cout) for _ in range(blocks)]
            self.add_module(f"layer{s}", nn.Sequential(*layers))
            cin = cout
        self.conv2 = _pointwise(cin, out_channels[3])
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # = avg_pool 4 at 32×32
        self.linear = nn.Linear(out_channels[3], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return self.linear(torch.flatten(self.avgpool(out), 1))


@register_model("cifar.shufflev2")
def shufflev2(num_classes: int = 100) -> CifarShuffleNetV2:
    """CIFAR ShuffleNetV2, net size 1 (reference ``ShuffleV2``)."""
    return CifarShuffleNetV2(num_classes=num_classes)


@register_stage_preset(lambda m: model_name(m) == "cifar.shufflev2")
def shufflev2_stage_taps(model: nn.Module, preact: bool) -> OrderedDict[str, str]:
    """ShuffleNetV2 stage taps; the pre-ReLU stage features are not shuffled (as in the reference)."""
    taps: OrderedDict[str, str] = OrderedDict(stem="bn1!relu")
    for s in (1, 2, 3):
        layer = f"layer{s}"
        taps[f"stage{s}"] = f"{layer}.{len(model.get_submodule(layer)) - 1}.preact" if preact else layer
    taps["pooled"] = "avgpool"
    return taps
