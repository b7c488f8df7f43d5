"""Object detection and instance segmentation: torchvision detectors by name, COCO-format data and
evaluation, and ReviewKD on FPN levels (``ReviewKDDetection``). See docs/detection.md."""

from kdistill.detection.data import (
    CocoDetectionData,
    SyntheticShapesCOCO,
    check_annotations,
    check_targets,
    coco_target,
    collate,
    encode_rle,
    segmentation_to_mask,
)
from kdistill.detection.distiller import ReviewKDDetection
from kdistill.detection.evaluate import (
    coco_evaluate,
    evaluate_detector,
    predictions_to_coco,
    targets_to_coco,
)
from kdistill.detection.models import (
    build_detector,
    detector_kind,
    list_detectors,
    load_detector_weights,
    mobilenet_v2_fpn_backbone,
    resnet_fpn_backbone,
)
from kdistill.detection.presets import PAIRS, DetectionPair, get_pair

__all__ = [
    "PAIRS",
    "CocoDetectionData",
    "DetectionPair",
    "ReviewKDDetection",
    "SyntheticShapesCOCO",
    "build_detector",
    "check_annotations",
    "check_targets",
    "coco_evaluate",
    "coco_target",
    "collate",
    "detector_kind",
    "encode_rle",
    "evaluate_detector",
    "get_pair",
    "list_detectors",
    "load_detector_weights",
    "mobilenet_v2_fpn_backbone",
    "predictions_to_coco",
    "resnet_fpn_backbone",
    "segmentation_to_mask",
    "targets_to_coco",
]
