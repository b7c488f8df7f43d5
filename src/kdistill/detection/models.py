"""Detectors by name, built with torchvision's own classes (no rewritten models).

Names: ``<kind>_<backbone>_fpn`` with kind ``fasterrcnn``, ``maskrcnn`` or ``retinanet`` and
backbone ``resnet18/34/50/101/152`` or ``mobilenet_v2``, e.g. ``fasterrcnn_resnet101_fpn``; and
``torchvision.<builder>`` for any builder of ``torchvision.models.detection`` (stock architecture,
e.g. ``torchvision.fasterrcnn_mobilenet_v3_large_fpn``). Every R-CNN backbone returns the five FPN
levels ``'0','1','2','3','pool'`` (P2-P6); every RetinaNet backbone ``'0','1','2','p6','p7'``
(P3-P7), 256 channels each, which is what the review distiller pairs level by level.

No weights are ever downloaded: ``backbone_weights`` and ``checkpoint`` are local files read with
``torch.load(weights_only=True)`` or safetensors.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models import detection as tvd
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from kdistill.utils import ConfigError, unknown_name_error

KINDS = ("fasterrcnn", "maskrcnn", "retinanet")
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
BACKBONES = (*RESNETS, "mobilenet_v2")
NORMS = ("frozen", "batchnorm")
_NAME = re.compile(r"^(?P<kind>[a-z]+)_(?P<backbone>resnet\d+|mobilenet_v2)_fpn$")

# Slim heads for CPU runs: fewer proposals and sampled RoIs (the box head dominates a CPU step).
SLIM_HEADS: dict[str, Any] = {
    "rpn_pre_nms_top_n_train": 600,
    "rpn_post_nms_top_n_train": 300,
    "rpn_pre_nms_top_n_test": 300,
    "rpn_post_nms_top_n_test": 150,
    "box_batch_size_per_image": 64,
}


def list_detectors() -> list[str]:
    """Every ``<kind>_<backbone>_fpn`` name (``torchvision.<builder>`` names are accepted as well)."""
    return [f"{k}_{b}_fpn" for k in KINDS for b in BACKBONES]


def detector_kind(name: str) -> str:
    """``fasterrcnn`` / ``maskrcnn`` / ``retinanet`` (or the stock builder's family) for a detector name."""
    if name.startswith("torchvision."):
        builder = name.split(".", 1)[1]
        for kind in (*KINDS, "fcos", "keypointrcnn", "ssd"):
            if builder.startswith(kind):
                return kind
        raise unknown_name_error("torchvision detection builder", builder, _torchvision_builders())
    m = _NAME.match(name)
    if not m or m["kind"] not in KINDS or m["backbone"] not in BACKBONES:
        raise unknown_name_error("detector", name, [*list_detectors(), "torchvision.<builder>"])
    return m["kind"]


def _torchvision_builders() -> list[str]:
    return sorted(n for n in dir(tvd) if n[0].islower() and callable(getattr(tvd, n)) and "_" in n and
                  any(n.startswith(k) for k in (*KINDS, "fcos", "keypointrcnn", "ssd")))


def _norm_layer(norm: str) -> type[nn.Module]:
    if norm not in NORMS:
        raise unknown_name_error("detector norm", norm, NORMS)
    return FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local ``.safetensors``/``.pt``/``.pth`` file (never unpickles code)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an unsafe pickle or a damaged file: refuse, name the file
        raise ConfigError(f"cannot read weights from {str(path)!r} (weights-only loading): {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"{str(path)!r} does not hold a state dict")
    return state


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], what: str, strict: bool = True) -> None:
    own = module.state_dict()
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
           if k in own and own[k].shape != v.shape]
    if bad:
        raise ConfigError(f"{what}: shapes do not match: " + "; ".join(bad[:5]))
    missing, unexpected = module.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise ConfigError(f"{what}: missing keys {list(missing)[:5]}, unexpected keys {list(unexpected)[:5]}")


def _freeze(named: list[tuple[str, nn.Module]], trainable: int) -> None:
    """Keep only the last ``trainable`` of the named blocks trainable (torchvision's convention)."""
    if not 0 <= trainable <= len(named):
        raise ConfigError(f"trainable_layers must be in [0, {len(named)}], got {trainable}")
    for _, block in named[: len(named) - trainable]:
        block.requires_grad_(False)


def resnet_fpn_backbone(
    depth: int | str,
    *,
    retinanet: bool = False,
    weights: str | None = None,
    trainable_layers: int = 3,
    norm: str = "frozen",
    zero_init_residual: bool = False,
    p6p7_from: str = "c5",
) -> BackboneWithFPN:
    """A torchvision ResNet of any depth wrapped in ``BackboneWithFPN``.

    R-CNN: C2-C5 → P2-P5 + max-pool P6 (keys ``0..3, pool``). RetinaNet: C3-C5 → P3-P5 + P6/P7
    computed from C5 (``p6p7_from="c5"``, Detectron2 and torchvision v2) or from P5 (``"p5"``,
    torchvision's v1 RetinaNet). ``weights``: a local ImageNet state dict for the ResNet.
    """
    name = depth if isinstance(depth, str) else f"resnet{depth}"
    if name not in RESNETS:
        raise unknown_name_error("ResNet depth", name, RESNETS)
    body = getattr(tvm, name)(weights=None, norm_layer=_norm_layer(norm), zero_init_residual=zero_init_residual)
    if weights:
        _load_into(body, {k: v for k, v in load_state(weights).items() if not k.startswith("fc.")},
                   f"backbone weights {weights!r}", strict=False)
    stem = nn.ModuleList([body.conv1, body.bn1])
    _freeze([("conv1", stem), ("layer1", body.layer1), ("layer2", body.layer2), ("layer3", body.layer3),
             ("layer4", body.layer4)], trainable_layers)
    c = [64, 128, 256, 512] if name in ("resnet18", "resnet34") else [256, 512, 1024, 2048]
    if retinanet:
        if p6p7_from not in ("c5", "p5"):
            raise unknown_name_error("p6p7_from", p6p7_from, ("c5", "p5"))
        extra = LastLevelP6P7(c[3] if p6p7_from == "c5" else 256, 256)
        return BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"}, c[1:], 256, extra_blocks=extra,
                               norm_layer=None)
    return BackboneWithFPN(body, {f"layer{i}": str(i - 1) for i in range(1, 5)}, c, 256,
                           extra_blocks=LastLevelMaxPool())


def mobilenet_v2_fpn_backbone(
    *,
    retinanet: bool = False,
    weights: str | None = None,
    trainable_layers: int | None = None,
    norm: str = "frozen",
) -> BackboneWithFPN:
    """MobileNetV2 FPN on the last block of each resolution (24, 32, 96, 320 channels at strides
    4-32), the layout of the ReviewKD paper's MobileNetV2 student, so it yields the same five
    levels as a ResNet-FPN. All layers trainable by default."""
    net = tvm.mobilenet_v2(weights=None, norm_layer=_norm_layer(norm))
    if weights:
        _load_into(net, {k: v for k, v in load_state(weights).items() if not k.startswith("classifier.")},
                   f"backbone weights {weights!r}", strict=False)
    features = net.features
    stages = [("0", features[0:2]), ("1", features[2:4]), ("2", features[4:7]), ("3", features[7:14]),
              ("4", features[14:18])]
    _freeze(stages, len(stages) if trainable_layers is None else trainable_layers)
    if retinanet:
        return BackboneWithFPN(features, {"6": "0", "13": "1", "17": "2"}, [32, 96, 320], 256,
                               extra_blocks=LastLevelP6P7(320, 256))
    return BackboneWithFPN(features, {"3": "0", "6": "1", "13": "2", "17": "3"}, [24, 32, 96, 320], 256,
                           extra_blocks=LastLevelMaxPool())


def build_detector(
    name: str,
    num_classes: int,
    *,
    backbone_weights: str | None = None,
    checkpoint: str | None = None,
    trainable_layers: int | None = None,
    norm: str = "frozen",
    zero_init_residual: bool = False,
    p6p7_from: str = "c5",
    slim: bool = False,
    **detector_kwargs: Any,
) -> nn.Module:
    """A torchvision detector by name (see the module docstring), randomly initialised unless
    ``backbone_weights`` (ImageNet backbone) or ``checkpoint`` (whole detector) name local files.

    ``detector_kwargs`` go to the torchvision class (``min_size``, ``max_size``,
    ``rpn_post_nms_top_n_train``, ``box_batch_size_per_image``, ...); ``slim=True`` adds the
    CPU-sized head settings of ``SLIM_HEADS`` (R-CNN only) under any explicit kwargs.
    """
    if int(num_classes) != num_classes or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2 (background + classes), got {num_classes}")
    kind = detector_kind(name)
    kwargs = dict(detector_kwargs)
    if slim and kind in ("fasterrcnn", "maskrcnn"):
        kwargs = {**SLIM_HEADS, **kwargs}
    if name.startswith("torchvision."):
        builder = getattr(tvd, name.split(".", 1)[1], None)
        if builder is None:
            raise unknown_name_error("torchvision detection builder", name.split(".", 1)[1], _torchvision_builders())
        if trainable_layers is not None:
            kwargs["trainable_backbone_layers"] = trainable_layers
        model = builder(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
    else:
        backbone_name = _NAME.match(name)["backbone"]  # type: ignore[index]
        retinanet = kind == "retinanet"
        if backbone_name == "mobilenet_v2":
            backbone = mobilenet_v2_fpn_backbone(retinanet=retinanet, weights=backbone_weights,
                                                 trainable_layers=trainable_layers, norm=norm)
        else:
            backbone = resnet_fpn_backbone(backbone_name, retinanet=retinanet, weights=backbone_weights,
                                           trainable_layers=3 if trainable_layers is None else trainable_layers,
                                           norm=norm, zero_init_residual=zero_init_residual, p6p7_from=p6p7_from)
        cls = {"fasterrcnn": tvd.FasterRCNN, "maskrcnn": tvd.MaskRCNN, "retinanet": tvd.RetinaNet}[kind]
        try:
            model = cls(backbone, num_classes=num_classes, **kwargs)
        except TypeError as exc:
            raise ConfigError(f"detector {name!r}: bad option: {exc}") from exc
    model.kdistill_name = name  # type: ignore[assignment]
    if checkpoint:
        load_detector_weights(model, checkpoint, num_classes=num_classes)
    return model


def head_num_classes(state: dict[str, torch.Tensor]) -> int | None:
    """The class count a detector state dict was trained for (R-CNN box predictor or RetinaNet head)."""
    if "roi_heads.box_predictor.cls_score.weight" in state:
        return int(state["roi_heads.box_predictor.cls_score.weight"].shape[0])
    w = state.get("head.classification_head.cls_logits.weight")
    b = state.get("head.classification_head.cls_logits.bias")
    a = state.get("head.regression_head.bbox_reg.weight")
    if w is not None and b is not None and a is not None:
        anchors = a.shape[0] // 4
        return int(b.shape[0] // anchors)
    return None


def load_detector_weights(model: nn.Module, path: str | Path, *, num_classes: int | None = None) -> None:
    """Load a whole-detector state dict from a local file, with a clear error on a class-count
    mismatch (``num_classes`` = what the data needs) or on any other key/shape difference."""
    state = load_state(path)
    state = OrderedDict((k.removeprefix("student."), v) for k, v in state.items())
    found = head_num_classes(state)
    if num_classes is not None and found is not None and found != num_classes:
        raise ConfigError(f"checkpoint {str(path)!r} was trained for {found} classes (background included) but "
                          f"the data needs num_classes={num_classes}; use a checkpoint trained on these categories "
                          "or set data.num_classes to match")
    _load_into(model, state, f"detector checkpoint {str(path)!r}")
