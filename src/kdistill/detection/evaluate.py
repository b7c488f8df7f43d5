"""COCO evaluation (AP, AP50, AP75, APs, APm, APl for boxes and masks) with pycocotools' COCOeval or
faster-coco-eval's ``COCOeval_faster`` (the same numbers in less time; docs/detection.md shows the comparison)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdistill.utils import ConfigError

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")
BACKENDS = ("auto", "pycocotools", "faster_coco_eval")


def _pycocotools():
    try:
        from pycocotools import mask as mask_utils
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ConfigError("COCO evaluation needs pycocotools: pip install 'kdistill[detection]'") from exc
    return COCO, COCOeval, mask_utils


def coco_backend(name: str = "auto") -> tuple[str, Any, Any]:
    """``(name, COCO, COCOeval)`` of an evaluation backend. ``auto`` is faster-coco-eval when it is
    installed (it gives pycocotools' numbers in less time), else pycocotools."""
    if name not in BACKENDS:
        raise ConfigError(f"COCO evaluation backend must be one of {BACKENDS}, got {name!r}")
    if name in ("auto", "faster_coco_eval"):
        try:
            from faster_coco_eval import COCO, COCOeval_faster
        except ImportError as exc:
            if name == "faster_coco_eval":
                raise ConfigError("COCO evaluation backend 'faster_coco_eval' needs the faster-coco-eval package: "
                                  "pip install faster-coco-eval (or choose 'pycocotools' or 'auto')") from exc
        else:
            return "faster_coco_eval", COCO, COCOeval_faster
    COCO, COCOeval, _ = _pycocotools()
    return "pycocotools", COCO, COCOeval


def coco_from_dict(dataset: dict[str, Any], backend: str = "pycocotools"):
    """A ``COCO`` object of ``backend`` from an annotation dict (quietly)."""
    _, COCO, _ = coco_backend(backend)
    gt = COCO()
    gt.dataset = {k: v for k, v in dataset.items()}
    gt.dataset.setdefault("info", {})
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def predictions_to_coco(predictions: Sequence[dict[str, Tensor]], image_ids: Sequence[int],
                        mask_threshold: float = 0.5) -> list[dict[str, Any]]:
    """COCO result records from torchvision predictions (boxes XYXY in original-image pixels;
    Mask R-CNN masks [N, 1, H, W] probabilities, thresholded and RLE-encoded)."""
    _, _, mask_utils = _pycocotools()
    results = []
    for pred, image_id in zip(predictions, image_ids, strict=True):
        boxes = pred["boxes"].detach().float().cpu()
        if not len(boxes):
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores, labels = pred["scores"].detach().float().cpu().tolist(), pred["labels"].cpu().tolist()
        rles: list[Any] = [None] * len(boxes)
        if "masks" in pred:
            masks = pred["masks"].detach().cpu()
            if masks.dim() == 4:
                masks = masks[:, 0]
            binary = (masks > mask_threshold) if masks.dtype.is_floating_point else masks.bool()
            array = np.asfortranarray(binary.numpy().astype(np.uint8).transpose(1, 2, 0))
            rles = mask_utils.encode(array)
            for rle in rles:
                rle["counts"] = rle["counts"].decode("ascii")
        for box, score, label, rle in zip(xywh, scores, labels, rles, strict=True):
            record = {"image_id": int(image_id), "category_id": int(label), "bbox": [round(v, 3) for v in box],
                      "score": float(score)}
            if rle is not None:
                record["segmentation"] = rle
            results.append(record)
    return results


def coco_evaluate(ground_truth: dict[str, Any], results: list[dict[str, Any]],
                  iou_types: Sequence[str] = ("bbox",), backend: str = "auto") -> dict[str, float]:
    """COCOeval stats as fractions: ``{"bbox_AP": ..., "bbox_AP50": ..., "segm_AP": ...}``, computed by
    ``backend`` (see :func:`coco_backend`). No detections at all gives zeros (COCOeval cannot load an
    empty result list)."""
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ConfigError(f"iou type must be one of {IOU_TYPES}, got {iou_type!r}")
    backend, _, COCOeval = coco_backend(backend)
    gt = coco_from_dict(ground_truth, backend)
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        usable = [r for r in results if iou_type == "bbox" or "segmentation" in r]
        if not usable:
            metrics.update({f"{iou_type}_{n}": 0.0 for n in STAT_NAMES})
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes([dict(r) for r in usable])
            # faster-coco-eval computes mask IoUs in a thread pool: as many threads as torch may use
            options = {"rle_iou_max_workers": max(1, torch.get_num_threads())} if backend == "faster_coco_eval" else {}
            ev = COCOeval(gt, dt, iou_type, **options)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        # COCOeval reports -1 where a size range has no ground truth: keep it, it is not a score of 0
        metrics.update({f"{iou_type}_{n}": float(v) for n, v in zip(STAT_NAMES, ev.stats[:6], strict=True)})
    return metrics


def targets_to_coco(targets: Iterable[dict[str, Tensor]], categories: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A COCO ground-truth dict from torchvision targets (for data sets without an annotation file)."""
    _, _, mask_utils = _pycocotools()
    images, annotations = [], []
    for target in targets:
        image_id = int(target["image_id"])
        masks = target.get("masks")
        h, w = (int(masks.shape[-2]), int(masks.shape[-1])) if masks is not None else (0, 0)
        images.append({"id": image_id, "height": h, "width": w})
        boxes = target["boxes"].tolist()
        for i, (x1, y1, x2, y2) in enumerate(boxes):
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": int(target["labels"][i]),
                   "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": int(target["iscrowd"][i]) if "iscrowd" in target
                   else 0, "area": float(target["area"][i]) if "area" in target else (x2 - x1) * (y2 - y1)}
            if masks is not None:
                rle = mask_utils.encode(np.asfortranarray(masks[i].numpy().astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                ann["segmentation"] = rle
            annotations.append(ann)
    return {"images": images, "annotations": annotations, "categories": list(categories)}


@torch.no_grad()
def evaluate_detector(model: nn.Module, loader: Iterable, ground_truth: dict[str, Any],
                      iou_types: Sequence[str] = ("bbox",), device: torch.device | str = "cpu",
                      backend: str = "auto") -> dict[str, float]:
    """Run ``model`` (eval mode) over ``loader`` and score its predictions against ``ground_truth``."""
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    try:
        for images, targets in loader:
            outputs = model([img.to(device) for img in images])
            results += predictions_to_coco(outputs, [int(t["image_id"]) for t in targets])
    finally:
        model.train(was_training)
    return coco_evaluate(ground_truth, results, iou_types, backend)
