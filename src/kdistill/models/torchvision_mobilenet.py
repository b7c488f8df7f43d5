"""Stage preset for torchvision MobileNetV2 (``torchvision.mobilenet_v2``).

Stages are the last inverted-residual block at output strides 4, 8, 16 and 32 (``features.3``,
``features.6``, ``features.13``, ``features.17`` for the default configuration: 24@56, 32@28,
96@14, 320@7 at 224×224). Those are linear-bottleneck outputs (no activation follows inside the
block), so, as for the CIFAR MobileNetV2, the pre-ReLU preset equals the
post-ReLU one. Stem = ``features.0`` (conv-BN-ReLU6); pooled = spatial mean of the ``features``
output (torchvision pools functionally).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from kdistill.features import model_name, register_stage_preset


@register_stage_preset(lambda m: model_name(m) == "torchvision.mobilenet_v2")
def torchvision_mobilenet_v2_stage_taps(model: nn.Module, preact: bool) -> OrderedDict[str, str]:
    """torchvision MobileNetV2 stage taps: the block before each stride-2 block (after the first), and the last block."""
    features = model.get_submodule("features")
    blocks = [i for i, m in enumerate(features) if hasattr(m, "use_res_connect")]
    downsampling = [i for i in blocks if getattr(features[i], "stride", 1) == 2]
    ends = [i - 1 for i in downsampling[1:]] + [blocks[-1]]
    taps: OrderedDict[str, str] = OrderedDict(stem="features.0")
    for s, index in enumerate(ends, 1):
        taps[f"stage{s}"] = f"features.{index}"
    taps["pooled"] = "features!mean"
    return taps
