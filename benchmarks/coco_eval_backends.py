"""COCO evaluation backends: pycocotools' COCOeval against faster-coco-eval's COCOeval_faster.

Both score the same predictions through ``kdistill.detection.coco_evaluate`` (boxes and masks; AP,
AP50, AP75, APs, APm, APl); the table shows every number of each backend, the largest difference, and
the time of a whole evaluation (ground truth indexed, results loaded, evaluate + accumulate +
summarize), median of ``--repeats`` interleaved rounds, process-CPU and wall time, one thread.

Prediction sets:

* ``synthetic/<run>``: the predictions of the detectors trained by ``benchmarks/detection.py``
  (teacher, plain student, ReviewKD student) on its 64 synthetic validation images. Skipped when
  those runs are not in the cache.
* ``coco128-val`` / ``coco128-train``: the real coco128-seg annotations (polygons, 80 classes) with
  predictions made from the ground truth by a seeded perturbation (boxes and masks shifted and
  rescaled, some instances missed, some labels swapped, false positives added, random scores), so
  every AP column has a value strictly between 0 and 1.
* ``coco128-val-x50``: the val split tiled 50 times under new image ids (5,000 images, the size of
  COCO val2017), for the timing at that scale.

    python benchmarks/coco_eval_backends.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED = ROOT.parent / "shared"
COMMAND = "python benchmarks/coco_eval_backends.py"
BACKENDS = ("pycocotools", "faster_coco_eval")
SYNTHETIC_RUNS = "bench-detection/train320-val64-t4-s2"


def uptime() -> str:
    """The machine load (``uptime``) at this moment."""
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def synthetic_sets(cache: Path) -> dict[str, tuple[dict[str, Any], list[dict[str, Any]], tuple[str, ...]]]:
    """Ground truth and predictions of the detection benchmark's trained runs (predictions cached)."""
    from kdistill.detection.config import DetectionConfig
    from kdistill.detection.engine import iou_types_for, load_detection_data, load_detector_from_run, make_loader
    from kdistill.detection.evaluate import predictions_to_coco
    from kdistill.typed import build_dataclass

    sets = {}
    for run in ("teacher", "student", "reviewkd"):
        folder = cache / SYNTHETIC_RUNS / run
        if not (folder / "student.safetensors").is_file():
            print(f"skipping synthetic/{run}: {folder} has no trained detector (run benchmarks/detection.py)")
            continue
        model, card = load_detector_from_run(folder)
        cfg = build_dataclass(DetectionConfig, card["recipe"])
        data = load_detection_data(cfg)
        saved = cache / "coco-eval-backends" / f"synthetic-{run}.json"
        if saved.is_file():
            results = json.loads(saved.read_text())
        else:
            results = []
            with torch.no_grad():
                for images, targets in make_loader(data.val, 4, False, 0):
                    results += predictions_to_coco(model(images), [int(t["image_id"]) for t in targets])
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(results))
        sets[f"synthetic/{run}"] = (data.ground_truth, results, iou_types_for(card["model"]))
    return sets


def perturbed_predictions(gt: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    """Detections made from the ground truth: each instance found with probability 0.85, its box and
    mask shifted and rescaled by up to ~15% of its size, its label swapped with probability 0.1, a
    random score; plus 0-3 false positives per image."""
    from pycocotools import mask as mask_utils

    from kdistill.detection.data import segmentation_to_mask

    rng = np.random.default_rng(seed)
    images = {img["id"]: img for img in gt["images"]}
    cat_ids = [c["id"] for c in gt["categories"]]
    by_image: dict[int, list[dict[str, Any]]] = {i: [] for i in images}
    for ann in gt["annotations"]:
        by_image[ann["image_id"]].append(ann)
    results = []

    def record(image_id: int, cat: int, mask: np.ndarray, score: float) -> None:
        ys, xs = np.nonzero(mask)
        if not len(xs):
            return
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        box = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
        results.append({"image_id": image_id, "category_id": int(cat), "bbox": box, "score": round(score, 4),
                        "segmentation": rle})

    for image_id, anns in by_image.items():
        h, w = images[image_id]["height"], images[image_id]["width"]
        for ann in anns:
            if rng.random() > 0.85:
                continue
            mask = segmentation_to_mask(ann["segmentation"], h, w)
            bw, bh = ann["bbox"][2], ann["bbox"][3]
            dx, dy = (int(round(v)) for v in rng.normal(0, 0.08, 2) * (bw, bh))
            scale = float(np.clip(rng.normal(1, 0.08), 0.7, 1.3))
            ys, xs = np.nonzero(mask)
            if not len(xs):
                continue
            # the moved mask by inverse mapping: destination pixel -> source pixel (no holes when enlarged)
            cx, cy = xs.mean(), ys.mean()
            gy, gx = np.mgrid[0:h, 0:w]
            sx = np.round(cx + (gx - cx - dx) / scale).astype(int)
            sy = np.round(cy + (gy - cy - dy) / scale).astype(int)
            inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
            moved = np.zeros((h, w), dtype=np.uint8)
            moved[inside] = mask[sy[inside], sx[inside]]
            cat = ann["category_id"] if rng.random() > 0.1 else int(rng.choice(cat_ids))
            record(image_id, cat, moved, float(rng.uniform(0.05, 1.0)))
        for _ in range(int(rng.integers(0, 4))):
            bw, bh = int(rng.integers(4, max(5, w // 3))), int(rng.integers(4, max(5, h // 3)))
            x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            mask = np.zeros((h, w), dtype=np.uint8)
            mask[y0:y0 + bh, x0:x0 + bw] = 1
            record(image_id, int(rng.choice(cat_ids)), mask, float(rng.uniform(0.05, 0.6)))
    return results


def tiled(gt: dict[str, Any], results: list[dict[str, Any]], times: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The same images ``times`` times under new image (and annotation) ids."""
    step = max(img["id"] for img in gt["images"]) + 1
    images, anns, res = [], [], []
    for k in range(times):
        images += [{**img, "id": img["id"] + k * step} for img in gt["images"]]
        anns += [{**a, "image_id": a["image_id"] + k * step, "id": len(anns) + i + 1} for i, a in enumerate(gt["annotations"])]
        res += [{**r, "image_id": r["image_id"] + k * step} for r in results]
    return {**gt, "images": images, "annotations": anns}, res


def coco128_sets(cache: Path) -> dict[str, tuple[dict[str, Any], list[dict[str, Any]], tuple[str, ...]]]:
    """The coco128-seg splits with perturbed-ground-truth predictions, and the val split tiled 50 times."""
    from kdistill.detection.data import unpack_cached

    archive = SHARED / "data" / "coco128-seg.tar.gz"
    folder = cache / "coco128-seg" / "coco128-seg"
    if not (folder / "annotations").is_dir():
        if not archive.is_file():
            print(f"skipping coco128: {archive} is missing")
            return {}
        folder = unpack_cached(archive, cache) / "coco128-seg"
    sets = {}
    for split in ("val2017", "train2017"):
        gt = json.loads((folder / "annotations" / f"instances_{split}.json").read_text())
        sets[f"coco128-{split[:-4]}"] = (gt, perturbed_predictions(gt, seed=0), ("bbox", "segm"))
    gt, res, iou = sets["coco128-val"]
    sets["coco128-val-x50"] = (*tiled(gt, res, 50), iou)
    return sets


def compare(gt: dict[str, Any], results: list[dict[str, Any]], iou_types: tuple[str, ...],
            repeats: int) -> dict[str, Any]:
    """Every stat of both backends and the median timings of ``repeats`` interleaved rounds."""
    from kdistill.detection.evaluate import coco_evaluate

    metrics: dict[str, dict[str, float]] = {}
    times: dict[str, dict[str, list[float]]] = {b: {"cpu": [], "wall": []} for b in BACKENDS}
    for _ in range(repeats):
        for backend in BACKENDS:
            c0, w0 = time.process_time(), time.perf_counter()
            metrics[backend] = coco_evaluate(gt, results, iou_types, backend=backend)
            times[backend]["cpu"].append(time.process_time() - c0)
            times[backend]["wall"].append(time.perf_counter() - w0)
    a, b = metrics[BACKENDS[0]], metrics[BACKENDS[1]]
    return {"images": len(gt["images"]), "ground_truth": len(gt["annotations"]), "detections": len(results),
            "metrics": metrics, "max_abs_difference": max(abs(a[k] - b[k]) for k in a), "bit_identical": a == b,
            "median_seconds": {k: {m: statistics.median(v) for m, v in d.items()} for k, d in times.items()}}


def percent(value: float) -> str:
    """A COCOeval fraction in percent; COCOeval's -1 (no ground truth of that size) as n/a."""
    return "n/a" if value == -1 else f"{100 * value:.3f}"


def render(record: dict[str, Any]) -> str:
    lines = ["# COCO evaluation backends: pycocotools against faster-coco-eval", "",
             f"Command (from the repository root; `KDISTILL_CACHE` names the cache folder): `{COMMAND} "
             f"{' '.join(record['argv'])}`.", "",
             f"Versions: pycocotools {record['versions']['pycocotools']}, faster-coco-eval "
             f"{record['versions']['faster_coco_eval']}. One thread (faster-coco-eval's mask-IoU pool gets "
             "`torch.get_num_threads()` workers). Machine: " + record["machine"] + ".", "",
             f"Load at the start: `{record['load_start']}`; at the end: `{record['load_end']}`.", "",
             "Each backend ran through `kdistill.detection.coco_evaluate(..., backend=...)` on the same "
             "ground truth and predictions. The synthetic sets are the predictions of the detectors trained by "
             "`benchmarks/detection.py`; the coco128 sets are the real coco128-seg annotations with predictions "
             "made by perturbing the ground truth (seeded: shifted and rescaled boxes and masks, missed instances, "
             "swapped labels, false positives); `x50` tiles the 100 val images 50 times (5,000 images, the "
             "size of COCO val2017). n/a: no ground-truth object of that size (COCOeval reports -1, both backends "
             "alike).", "",
             "## Numbers (percent; pycocotools / faster-coco-eval)", "",
             "| set | iou | AP | AP50 | AP75 | APs | APm | APl | largest difference |",
             "|---|---|---|---|---|---|---|---|---|"]
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    for name, row in record["sets"].items():
        p, f = row["metrics"]["pycocotools"], row["metrics"]["faster_coco_eval"]
        for iou in ("bbox", "segm"):
            if f"{iou}_AP" not in p:
                continue
            cells = [f"{percent(p[f'{iou}_{n}'])} / {percent(f[f'{iou}_{n}'])}" for n in names]
            diff = max(abs(p[f"{iou}_{n}"] - f[f"{iou}_{n}"]) for n in names)
            lines.append(f"| {name} | {iou} | {' | '.join(cells)} | {diff:.1e} |")
    lines += ["", "## Time of one whole evaluation (boxes and masks; medians)", "",
              "| set | images | detections | pycocotools process-CPU s | faster process-CPU s | pycocotools wall s | faster wall s "
              "| speed-up (CPU) |", "|---|---|---|---|---|---|---|---|"]
    for name, row in record["sets"].items():
        t = row["median_seconds"]
        lines.append(f"| {name} | {row['images']} | {row['detections']} | {t['pycocotools']['cpu']:.3f} | "
                     f"{t['faster_coco_eval']['cpu']:.3f} | {t['pycocotools']['wall']:.3f} | "
                     f"{t['faster_coco_eval']['wall']:.3f} | "
                     f"{t['pycocotools']['cpu'] / t['faster_coco_eval']['cpu']:.1f}x |")
    exact = sum(r["bit_identical"] for r in record["sets"].values())
    worst = max(r["max_abs_difference"] for r in record["sets"].values())
    lines += ["", f"Largest difference between the backends over all sets and columns: {worst:.1e} (as a fraction; "
              f"{exact} of {len(record['sets'])} sets bit-identical in every column). Differences of ~1e-16 are the "
              "last bit of a double: the two backends sum the same precisions in a different order.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", default=None, help="cache folder (default $KDISTILL_CACHE)")
    parser.add_argument("--out", default=str(RESULTS / "coco_eval_backends"))
    parser.add_argument("--render", action="store_true", help="only rewrite the table from the saved JSON")
    args = parser.parse_args()
    out = Path(args.out)
    if args.render:
        out.with_suffix(".md").write_text(render(json.loads(out.with_suffix(".json").read_text())))
        return
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from importlib.metadata import version

    from kdistill.detection.data import default_cache_dir

    cache = Path(args.cache) if args.cache else default_cache_dir()
    from common import machine_line

    record: dict[str, Any] = {"argv": [a for a in sys.argv[1:]], "machine": machine_line(), "load_start": uptime(),
                              "versions": {"pycocotools": version("pycocotools"),
                                           "faster_coco_eval": version("faster-coco-eval")}, "sets": {}}
    for name, (gt, results, iou_types) in {**synthetic_sets(cache), **coco128_sets(cache)}.items():
        print(f"== {name}: {len(gt['images'])} images, {len(results)} detections", flush=True)
        record["sets"][name] = compare(gt, results, iou_types, args.repeats)
    record["load_end"] = uptime()
    out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    out.with_suffix(".md").write_text(render(record))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
