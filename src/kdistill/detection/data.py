"""COCO-format detection data: real COCO folders and a deterministic synthetic set.

Both datasets return ``(image, target)`` with a float image [3, H, W] in [0, 1] and torchvision's
target dict: ``boxes`` float32 [N, 4] (x1, y1, x2, y2), ``labels`` int64 (the COCO category id, so
a detector needs ``num_classes = max category id + 1``), ``masks`` uint8 [N, H, W], ``image_id``,
``area``, ``iscrowd``. No resizing happens here: the detector's own transform resizes and pads,
so student and teacher see one geometry. Images keep their own sizes; ``collate`` returns lists.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from kdistill.utils import ConfigError

log = logging.getLogger(__name__)
Target = dict[str, Tensor]


def _require_pycocotools():
    try:
        from pycocotools import mask as mask_utils
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ConfigError("COCO polygons and evaluation need pycocotools: pip install 'kdistill[detection]'") from exc
    return mask_utils


def collate(batch: Sequence[tuple[Tensor, Target]]) -> tuple[list[Tensor], list[Target]]:
    """Lists of images and targets (the detector's transform batches images of different sizes)."""
    images, targets = zip(*batch, strict=True) if batch else ((), ())
    return list(images), list(targets)


def hflip(image: Tensor, target: Target) -> tuple[Tensor, Target]:
    """Horizontal flip of an image with its boxes and masks."""
    width = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    target["boxes"] = boxes
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """One annotation's mask (uint8 [H, W]) from COCO polygons, uncompressed RLE or compressed RLE."""
    mask_utils = _require_pycocotools()
    if isinstance(segmentation, list):
        if not segmentation:
            return np.zeros((height, width), dtype=np.uint8)
        rles = mask_utils.frPyObjects(segmentation, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict):
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode()
    else:
        raise ValueError(f"unsupported segmentation {type(segmentation).__name__}")
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


def coco_target(
    annotations: Sequence[dict[str, Any]], image_id: int, height: int, width: int, with_masks: bool = True
) -> Target:
    """torchvision target from one image's COCO annotations: crowd regions and boxes without a
    positive width and height after clipping to the image are dropped (with their masks)."""
    boxes, labels, masks, areas = [], [], [], []
    for ann in annotations:
        if ann.get("iscrowd", 0):
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
        x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
        if x2 <= x1 or y2 <= y1:
            continue
        boxes.append([x1, y1, x2, y2])
        labels.append(int(ann["category_id"]))
        areas.append(float(ann.get("area", w * h)))
        if with_masks:
            masks.append(segmentation_to_mask(ann["segmentation"], height, width) if "segmentation" in ann
                         else np.zeros((height, width), dtype=np.uint8))
    target: Target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "image_id": torch.tensor(int(image_id)),
        "area": torch.tensor(areas, dtype=torch.float32),
        "iscrowd": torch.zeros(len(boxes), dtype=torch.int64),
    }
    if with_masks:
        target["masks"] = (torch.from_numpy(np.stack(masks)) if masks
                           else torch.zeros(0, height, width, dtype=torch.uint8))
    return target


def check_annotations(coco: dict[str, Any], source: str) -> None:
    """Clear errors for files a detector cannot train on: annotations of images that are not
    listed, unknown categories, malformed or negative boxes."""
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise ConfigError(f"{source}: COCO annotation file must have a list {key!r}")
    image_ids = {img["id"] for img in coco["images"]}
    category_ids = {cat["id"] for cat in coco["categories"]}
    for ann in coco["annotations"]:
        where = f"{source}: annotation {ann.get('id')!r}"
        if ann.get("image_id") not in image_ids:
            raise ConfigError(f"{where} references image_id {ann.get('image_id')!r}, which is not in 'images' "
                              f"({len(image_ids)} images listed)")
        if ann.get("category_id") not in category_ids:
            raise ConfigError(f"{where} has category_id {ann.get('category_id')!r}, not one of the 'categories' "
                              f"({sorted(category_ids)[:10]}...)")
        box = ann.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) and math.isfinite(v)
                                                                 for v in box)):
            raise ConfigError(f"{where}: bbox must be [x, y, width, height] of finite numbers, got {box!r}")
        if box[2] < 0 or box[3] < 0:
            raise ConfigError(f"{where}: bbox {box} has a negative width or height")


def check_targets(targets: Sequence[Target], num_classes: int | None = None) -> None:
    """Raise a ValueError naming the image and box for a degenerate box (x2 <= x1 or y2 <= y1, or
    not finite) or a label outside [1, num_classes) before torchvision's bare assertion would."""
    for target in targets:
        boxes, image_id = target["boxes"], int(target.get("image_id", torch.tensor(-1)))
        if boxes.numel():
            bad = ~torch.isfinite(boxes).all(dim=1) | (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
            if bad.any():
                i = int(bad.nonzero()[0])
                raise ValueError(f"image {image_id}: box {i} {boxes[i].tolist()} is degenerate (x2 must exceed x1 "
                                 "and y2 must exceed y1); remove it from the annotations")
        labels = target["labels"]
        if num_classes is not None and labels.numel() and (labels.min() < 1 or labels.max() >= num_classes):
            raise ValueError(f"image {image_id}: label {int(labels.max())} is outside [1, {num_classes - 1}]: "
                             f"the detector was built for num_classes={num_classes} (background included)")


class CocoDetectionData(Dataset):
    """A COCO-format folder: ``images_dir`` plus an ``instances_*.json`` annotation file.

    Checks at construction that every annotation's image is listed and every listed image file
    exists. ``train=True`` drops images without a usable box and flips horizontally with
    probability ``flip`` (a per-index generator seeded with ``seed`` and the epoch, so runs repeat).
    """

    def __init__(self, images_dir: str | Path, ann_file: str | Path, *, train: bool = False, flip: float = 0.5,
                 with_masks: bool = True, seed: int = 0):
        self.images_dir, ann_file = Path(images_dir), Path(ann_file)
        if not ann_file.is_file():
            raise ConfigError(f"annotation file {str(ann_file)!r} does not exist")
        if not self.images_dir.is_dir():
            raise ConfigError(f"image folder {str(self.images_dir)!r} does not exist")
        try:
            coco = json.loads(ann_file.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"annotation file {str(ann_file)!r} is not valid JSON: {exc}") from exc
        check_annotations(coco, str(ann_file))
        missing = [img["file_name"] for img in coco["images"] if not (self.images_dir / img["file_name"]).is_file()]
        if missing:
            raise ConfigError(f"{ann_file}: {len(missing)} listed image(s) missing from {self.images_dir}, e.g. "
                              f"{missing[:3]}")
        self.coco = coco
        self.categories = sorted(coco["categories"], key=lambda c: c["id"])
        self.num_classes = max(c["id"] for c in self.categories) + 1
        by_image: dict[int, list[dict[str, Any]]] = {img["id"]: [] for img in coco["images"]}
        for ann in coco["annotations"]:
            by_image[ann["image_id"]].append(ann)
        images = sorted(coco["images"], key=lambda img: img["id"])
        if train:
            def usable(img: dict[str, Any]) -> bool:
                return any(not a.get("iscrowd", 0) and a["bbox"][2] > 1 and a["bbox"][3] > 1 for a in by_image[img["id"]])

            images = [img for img in images if usable(img)]
        self.images, self.by_image = images, by_image
        self.train, self.flip, self.with_masks, self.seed, self.epoch = train, float(flip), with_masks, seed, 0

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """Change the flip draws (called by the training loop each epoch)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        from PIL import Image

        info = self.images[index]
        with Image.open(self.images_dir / info["file_name"]) as img:
            array = np.asarray(img.convert("RGB"))
        height, width = array.shape[:2]
        image = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)
        target = coco_target(self.by_image[info["id"]], info["id"], height, width, self.with_masks)
        if self.train and self.flip > 0:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            if rng.random() < self.flip:
                image, target = hflip(image, target)
        return image, target


# --- synthetic shapes -----------------------------------------------------------------------------
SHAPES = ("ellipse", "rectangle", "triangle", "pentagon", "star")


def _polygon(kind: str, cx: float, cy: float, rx: float, ry: float, angle: float) -> np.ndarray:
    if kind == "ellipse":
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        pts = np.stack([rx * np.cos(t), ry * np.sin(t)], 1)
    elif kind == "rectangle":
        pts = np.array([[-rx, -ry], [rx, -ry], [rx, ry], [-rx, ry]])
    elif kind == "triangle":
        pts = np.array([[0, -ry], [rx, ry], [-rx, ry]])
    elif kind == "pentagon":
        t = np.linspace(0, 2 * np.pi, 5, endpoint=False) - np.pi / 2
        pts = np.stack([rx * np.cos(t), ry * np.sin(t)], 1)
    else:
        t = np.linspace(0, 2 * np.pi, 10, endpoint=False) - np.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([rx * r * np.cos(t), ry * r * np.sin(t)], 1)
    c, s = math.cos(angle), math.sin(angle)
    pts = pts @ np.array([[c, s], [-s, c]])
    return pts + np.array([cx, cy])


def _rasterise(poly: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixel-centre point-in-polygon test (even-odd rule); used for RLE storage."""
    ys, xs = np.mgrid[0:height, 0:width]
    px, py = xs + 0.5, ys + 0.5
    inside = np.zeros((height, width), dtype=bool)
    n = len(poly)
    for i in range(n):
        x1, y1 = poly[i]
        x2, y2 = poly[(i + 1) % n]
        if y1 == y2:
            continue
        crosses = ((y1 <= py) & (py < y2)) | ((y2 <= py) & (py < y1))
        x_at = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (px < x_at)
    return inside.astype(np.uint8)


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Uncompressed COCO RLE: run lengths over the column-major pixels, starting with zeros."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


class SyntheticShapesCOCO(Dataset):
    """Deterministic COCO-format shapes on textured backgrounds, for tests, demos and benchmarks.

    Image ``i`` is generated from a generator seeded with ``(seed, i)``: any index, any order, any
    worker gives the same pixels. Each object's mask is rasterised once and everything else is
    derived from it (the painted pixels, ``bbox`` = mask extent, ``area`` = mask pixel count), so
    boxes, masks and areas always agree. Polygon storage uses pycocotools' own rasteriser, so the
    stored polygons decode to exactly the stored masks; RLE storage needs no pycocotools.
    ``image_size`` is (H, W) or ((min_h, max_h), (min_w, max_w)); category ids are 1..num_classes.
    """

    def __init__(
        self,
        num_images: int,
        image_size: Sequence[int] | Sequence[Sequence[int]] = (128, 160),
        num_classes: int = 3,
        max_objects: int = 4,
        size_range: Sequence[float] = (0.15, 0.45),
        mask_format: str = "polygon",
        seed: int = 0,
        flip: float = 0.0,
    ):
        if mask_format not in ("polygon", "rle"):
            raise ConfigError(f"mask_format must be 'polygon' or 'rle', got {mask_format!r}")
        if not 1 <= num_classes <= len(SHAPES):
            raise ConfigError(f"num_classes must be in [1, {len(SHAPES)}] (shapes {SHAPES}), got {num_classes}")
        if num_images < 1 or max_objects < 1:
            raise ConfigError("num_images and max_objects must be >= 1")
        self.num_images, self.num_object_classes = int(num_images), int(num_classes)
        h, w = image_size
        self.h_range = tuple(h) if isinstance(h, Sequence) else (int(h), int(h))
        self.w_range = tuple(w) if isinstance(w, Sequence) else (int(w), int(w))
        self.max_objects, self.size_range = int(max_objects), (float(size_range[0]), float(size_range[1]))
        self.mask_format, self.seed, self.flip, self.epoch = mask_format, int(seed), float(flip), 0
        self.num_classes = self.num_object_classes + 1
        self.categories = [{"id": i + 1, "name": SHAPES[i], "supercategory": "shape"}
                           for i in range(self.num_object_classes)]

    def __len__(self) -> int:
        return self.num_images

    def set_epoch(self, epoch: int) -> None:
        """Change the flip draws (called by the training loop each epoch)."""
        self.epoch = int(epoch)

    def generate(self, index: int) -> tuple[np.ndarray, list[dict[str, Any]], list[np.ndarray]]:
        """(uint8 image H×W×3, COCO annotations without ids, masks) for image ``index``."""
        rng = np.random.default_rng((self.seed, index))
        height = int(rng.integers(self.h_range[0], self.h_range[1] + 1))
        width = int(rng.integers(self.w_range[0], self.w_range[1] + 1))
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
        image = np.zeros((height, width, 3))
        for ch in range(3):
            layer = np.full((height, width), 0.5)
            for _ in range(int(rng.integers(1, 4))):
                freq, theta, phase = rng.uniform(0.02, 0.1), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
                layer += 0.15 * np.sin(2 * np.pi * freq * (xs * np.cos(theta) + ys * np.sin(theta)) + phase)
            image[..., ch] = layer
        image += rng.normal(0, 0.05, image.shape)
        boxes: list[tuple[float, float, float, float]] = []
        annotations, masks = [], []
        short = min(height, width)
        for _ in range(int(rng.integers(1, self.max_objects + 1))):
            label = int(rng.integers(1, self.num_object_classes + 1))
            for _try in range(20):
                size = rng.uniform(*self.size_range) * short
                rx, ry = size / 2 * rng.uniform(0.7, 1.0), size / 2 * rng.uniform(0.7, 1.0)
                reach = math.hypot(rx, ry) + 1
                if 2 * reach >= min(height, width):
                    continue
                cx, cy = rng.uniform(reach, width - reach), rng.uniform(reach, height - reach)
                angle = rng.uniform(0, np.pi) if SHAPES[label - 1] != "ellipse" else 0.0
                poly = _polygon(SHAPES[label - 1], cx, cy, rx, ry, angle)
                if self.mask_format == "polygon":
                    flat = [float(v) for v in np.round(poly, 2).reshape(-1)]
                    mask = segmentation_to_mask([flat], height, width)
                    segmentation: Any = [flat]
                else:
                    mask = _rasterise(poly, height, width)
                    segmentation = encode_rle(mask)
                if mask.sum() < 16:
                    continue
                yy, xx = np.nonzero(mask)
                box = (float(xx.min()), float(yy.min()), float(xx.max() + 1), float(yy.max() + 1))
                if any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes):
                    continue
                local = image[mask.astype(bool)].mean(0)
                color = rng.uniform(0, 1, 3)
                for _c in range(20):
                    if np.abs(color - local).max() >= 0.35:
                        break
                    color = rng.uniform(0, 1, 3)
                image[mask.astype(bool)] = color
                boxes.append(box)
                masks.append(mask)
                annotations.append({
                    "category_id": label, "segmentation": segmentation, "iscrowd": 0,
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "area": float(mask.sum()),
                })
                break
        pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        return pixels, annotations, masks

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        pixels, annotations, masks = self.generate(index)
        height, width = pixels.shape[:2]
        image = torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255)
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                 for a in annotations]
        target: Target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64),
            "masks": (torch.from_numpy(np.stack(masks)) if masks
                      else torch.zeros(0, height, width, dtype=torch.uint8)),
            "image_id": torch.tensor(index + 1),
            "area": torch.tensor([a["area"] for a in annotations], dtype=torch.float32),
            "iscrowd": torch.zeros(len(annotations), dtype=torch.int64),
        }
        if self.flip > 0 and np.random.default_rng((self.seed, self.epoch, index, 1)).random() < self.flip:
            image, target = hflip(image, target)
        return image, target

    def to_coco_dict(self) -> dict[str, Any]:
        """The whole set as a COCO annotation dict (1-based image and annotation ids)."""
        images, annotations = [], []
        for i in range(self.num_images):
            pixels, anns, _ = self.generate(i)
            images.append({"id": i + 1, "file_name": f"{i + 1:06d}.png", "height": int(pixels.shape[0]),
                           "width": int(pixels.shape[1])})
            for ann in anns:
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, **ann})
        return {"images": images, "annotations": annotations, "categories": self.categories}

    def write(self, root: str | Path) -> Path:
        """Save PNG images under ``root/images`` and ``root/annotations.json``; returns the JSON path."""
        from PIL import Image

        root = Path(root)
        (root / "images").mkdir(parents=True, exist_ok=True)
        coco = self.to_coco_dict()
        for i, info in enumerate(coco["images"]):
            Image.fromarray(self.generate(i)[0]).save(root / "images" / info["file_name"])
        path = root / "annotations.json"
        path.write_text(json.dumps(coco))
        return path


def default_cache_dir() -> Path:
    """``$KDISTILL_CACHE`` or ``~/.cache/kdistill``: where archives are unpacked once."""
    import os

    return Path(os.environ.get("KDISTILL_CACHE") or Path.home() / ".cache" / "kdistill")


def unpack_cached(archive: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Unpack a ``.tar.gz`` once into ``<cache>/<archive name>/`` (guarded by a file lock, so
    concurrent processes wait for the first one); returns that folder."""
    import fcntl
    import tarfile

    archive = Path(archive)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = archive.name.removesuffix(".tar.gz").removesuffix(".tgz")
    target = cache / name
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_dir():
            partial = cache / f".{name}.partial"
            if partial.exists():
                import shutil

                shutil.rmtree(partial)
            partial.mkdir()
            with tarfile.open(archive) as tar:
                tar.extractall(partial, filter="data")
            partial.rename(target)
    return target
