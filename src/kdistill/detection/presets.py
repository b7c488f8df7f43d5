"""The ReviewKD paper's detection pairs on torchvision detectors, with the paper's λ per pair.

Each preset names a teacher and a student detector (``build_detector`` names) and the loss weight
of the official configuration for that pair (Chen et al., CVPR 2021).
"""

from __future__ import annotations

from dataclasses import dataclass

from kdistill.utils import unknown_name_error


@dataclass(frozen=True)
class DetectionPair:
    """A teacher/student detector pair and the review loss weight used for it in the paper."""

    teacher: str
    student: str
    loss_weight: float
    paper: bool = True


PAIRS: dict[str, DetectionPair] = {
    "frcnn_r101_r18": DetectionPair("fasterrcnn_resnet101_fpn", "fasterrcnn_resnet18_fpn", 1.2),
    "frcnn_r101_r50": DetectionPair("fasterrcnn_resnet101_fpn", "fasterrcnn_resnet50_fpn", 1.0),
    "frcnn_r50_mv2": DetectionPair("fasterrcnn_resnet50_fpn", "fasterrcnn_mobilenet_v2_fpn", 2.0),
    "maskrcnn_r101_r18": DetectionPair("maskrcnn_resnet101_fpn", "maskrcnn_resnet18_fpn", 1.5),
    "maskrcnn_r101_r50": DetectionPair("maskrcnn_resnet101_fpn", "maskrcnn_resnet50_fpn", 0.8),
    "maskrcnn_r50_mv2": DetectionPair("maskrcnn_resnet50_fpn", "maskrcnn_mobilenet_v2_fpn", 1.0),
    "retinanet_r101_r50": DetectionPair("retinanet_resnet101_fpn", "retinanet_resnet50_fpn", 1.0),
}


def get_pair(name: str) -> DetectionPair:
    """A preset by name (``frcnn_r101_r18``, ...)."""
    if name not in PAIRS:
        raise unknown_name_error("detection pair", name, list(PAIRS))
    return PAIRS[name]
