"""MobileNet (V1) for ImageNet: the ResNet50 → MobileNet student of ReviewKD / CRD / OFD
(docs/methods/reviewkd.md).

Layout of the ReviewKD/OFD ImageNet definition: ``model`` = Sequential of a 3×3 conv-BN-ReLU stem
(32 channels, stride 2), 13 depthwise-separable blocks (``model.{1..13}`` =
[3×3 depthwise, BN, ReLU, 1×1, BN, ReLU], widths 64, 128 s2, 128, 256 s2, 256, 512 s2, 512×5,
1024 s2, 1024) and the average pool ``model.14``; then ``fc``. Parameter names therefore match
checkpoints saved from that code. Differences, none of which touches the state dict: ReLUs are out of
place (taps see pre-ReLU values), and the pool is adaptive (equal to
AvgPool 7 at 224×224, and valid at other sizes). PyTorch default initialisation, as in the reference.

Stage preset: blocks 3, 5, 11, 13 (128@56, 256@28, 512@14, 1024@7 at 224×224); the pre-ReLU variant
taps their last BN (``model.{i}.4``), i.e. "before the final ReLU" as in the ReviewKD ImageNet code;
pooled = the average pool of ReLU(block 13).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from kdistill.features import model_name, register_stage_preset
from kdistill.models.registry import register_model

# (output width, stride) of the 13 depthwise-separable blocks
_BLOCKS = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)
STAGE_BLOCKS = (3, 5, 11, 13)


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def _depthwise_separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU(),
        nn.Conv2d(cin, cout, 1, 1, 0, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class MobileNetV1(nn.Module):
    """MobileNet (V1, width 1.0) for 224×224 inputs."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_relu(3, 32, 2)]
        cin = 32
        for cout, stride in _BLOCKS:
            layers.append(_depthwise_separable(cin, cout, stride))
            cin = cout
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.model = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.model(x), 1))


@register_model("imagenet.mobilenet_v1")
def mobilenet_v1(num_classes: int = 1000) -> MobileNetV1:
    """ImageNet MobileNetV1 (the ReviewKD/CRD ResNet50 → MobileNet student of the ReviewKD and CRD papers)."""
    return MobileNetV1(num_classes)


@register_stage_preset(lambda m: model_name(m) == "imagenet.mobilenet_v1")
def mobilenet_v1_stage_taps(model: nn.Module, preact: bool) -> OrderedDict[str, str]:
    """MobileNetV1 stage taps: blocks 3, 5, 11, 13; pre-ReLU = their last BN (as ReviewKD uses them)."""
    taps: OrderedDict[str, str] = OrderedDict(stem="model.0")
    for s, block in enumerate(STAGE_BLOCKS, 1):
        taps[f"stage{s}"] = f"model.{block}.4" if preact else f"model.{block}"
    taps["pooled"] = f"model.{len(_BLOCKS) + 1}"
    return taps
