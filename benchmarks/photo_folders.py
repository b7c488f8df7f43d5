"""Image folders made from real photographs (the COCO images of ``../shared/data/coco128-seg.tar.gz``).

Three kinds, all in the ``<root>/<split>/<class>/<file>.jpg`` layout, written to a cache folder (never the repository):

* ``photos``: ``--count`` JPEGs of ordinary photo sizes (500×375, 375×500, 500×333, 640×480, ...), each a random
  crop of one of the 200 COCO photos, resized, maybe mirrored, saved at quality 85–95 (for the input-pipeline benchmark);
* ``objects``: every annotated COCO object (box at least 32 px a side) cropped with a margin into a folder named after
  its category, at its own size; every fourth object of a category → ``val/`` (a real-image classification set);
* ``imagenet-layout``: ``--classes`` class folders (``n00000000`` ...) with ``--per-class`` photo crops in ``train/``
  and ``val/`` (the layout of ImageNet, for smoke runs of the ImageNet recipes).

Each is written into a temporary folder renamed into place when complete, so an interrupted run leaves nothing half made.

    python benchmarks/photo_folders.py photos --count 20000 --out /work/cache/data13/photos-20000
    python benchmarks/photo_folders.py objects --out /work/cache/data13/coco-objects
    python benchmarks/photo_folders.py imagenet-layout --classes 1000 --per-class 2 --out /work/cache/data13/imagenet-layout
"""

from __future__ import annotations

import argparse
import fcntl
import json
import random
import shutil
import tarfile
from pathlib import Path

from common import SHARED
from PIL import Image

ARCHIVE = SHARED / "data" / "coco128-seg.tar.gz"
PHOTO_SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (640, 480), (480, 640), (500, 400), (450, 338))


def coco_root(cache: Path) -> Path:
    """The unpacked COCO128 folder under ``cache`` (unpacked once, under a lock)."""
    target = cache / "coco128-seg"
    images = target / "coco128-seg" / "train2017"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".coco128-seg.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not images.is_dir():
            if not ARCHIVE.is_file():
                raise SystemExit(f"real photos not available: {ARCHIVE} is missing")
            with tarfile.open(ARCHIVE) as tar:
                tar.extractall(target, filter="data")
    return target / "coco128-seg"


def source_photos(cache: Path) -> list[Path]:
    coco = coco_root(cache)
    return sorted((coco / "train2017").glob("*.jpg")) + sorted((coco / "val2017").glob("*.jpg"))


def photo_crop(src: Image.Image, rng: random.Random) -> Image.Image:
    """A random crop of ``src`` (30–100 % of its shorter side, the target's aspect ratio) at a photo size."""
    w, h = rng.choice(PHOTO_SIZES)
    scale = rng.uniform(0.3, 1.0)
    cw = min(src.width, src.height * w / h) * scale
    ch = cw * h / w
    left, top = rng.uniform(0, src.width - cw), rng.uniform(0, src.height - ch)
    out = src.resize((w, h), Image.BILINEAR, box=(left, top, left + cw, top + ch))
    return out.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else out


def _finish(tmp: Path, out: Path, meta: dict) -> None:
    (tmp / "folder.json").write_text(json.dumps(meta, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def make_photos(out: Path, count: int, classes: int, cache: Path, seed: int = 0, val_fraction: float = 0.0) -> None:
    """``count`` photo-sized crops spread over ``classes`` folders (``train/``, and ``val/`` if ``val_fraction``)."""
    rng = random.Random(seed)
    sources = [Image.open(p).convert("RGB") for p in source_photos(cache)]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    n_val = int(count * val_fraction)
    for i in range(count):
        split = "val" if i < n_val else "train"
        folder = tmp / split / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        photo_crop(rng.choice(sources), rng).save(folder / f"{i:07d}.jpg", quality=rng.randint(85, 95))
    _finish(tmp, out, {"kind": "photos", "count": count, "classes": classes, "seed": seed, "val": n_val})


def make_objects(out: Path, cache: Path, min_side: int = 32, margin: float = 0.1, min_count: int = 8) -> None:
    """Every COCO object of at least ``min_side`` px a side (both COCO splits), cropped with ``margin`` into its
    category's folder; every fourth object of a category goes to ``val/``; categories with fewer than ``min_count``
    objects are left out."""
    coco = coco_root(cache)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    objects: dict[str, list[tuple[Path, tuple[int, int, int, int], int]]] = {}  # annotation ids repeat across splits
    for name in ("train2017", "val2017"):
        ann = json.loads((coco / "annotations" / f"instances_{name}.json").read_text())
        cats = {c["id"]: c["name"].replace(" ", "_") for c in ann["categories"]}
        files = {im["id"]: coco / name / Path(im["file_name"]).name for im in ann["images"]}
        for a in ann["annotations"]:
            x, y, w, h = a["bbox"]
            if w >= min_side and h >= min_side:
                mx, my = w * margin, h * margin
                box = (int(x - mx), int(y - my), int(x + w + mx), int(y + h + my))
                objects.setdefault(cats[a["category_id"]], []).append((files[a["image_id"]], box, a["id"]))
    counts = {}
    for cat, items in sorted(objects.items()):
        if len(items) < min_count:
            continue
        for k, (path, box, ann_id) in enumerate(items):
            folder = tmp / ("val" if k % 4 == 3 else "train") / cat
            folder.mkdir(parents=True, exist_ok=True)
            with Image.open(path) as im:
                im = im.convert("RGB")
                clipped = (max(0, box[0]), max(0, box[1]), min(im.width, box[2]), min(im.height, box[3]))
                im.crop(clipped).save(folder / f"{path.parent.name}-{ann_id}.jpg", quality=92)
        counts[cat] = [len(items) - len(items) // 4, len(items) // 4]
    _finish(tmp, out, {"kind": "objects", "min_side": min_side, "margin": margin, "classes": counts})


def make_imagenet_layout(out: Path, classes: int, per_class: int, cache: Path, seed: int = 0) -> None:
    """``classes`` ImageNet-style class folders with ``per_class`` photo crops in ``train/`` and in ``val/``."""
    rng = random.Random(seed)
    sources = [Image.open(p).convert("RGB") for p in source_photos(cache)]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for split in ("train", "val"):
        for c in range(classes):
            folder = tmp / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                photo_crop(rng.choice(sources), rng).save(folder / f"{c:04d}_{k}.jpg", quality=90)
    _finish(tmp, out, {"kind": "imagenet-layout", "classes": classes, "per_class": per_class, "seed": seed})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("photos", "objects", "imagenet-layout"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--cache", default="/work/cache", help="where the COCO archive is unpacked")
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=2)
    parser.add_argument("--val-fraction", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out, cache = Path(args.out), Path(args.cache)
    if (out / "folder.json").is_file():
        print(f"{out} exists: {(out / 'folder.json').read_text()[:200]}")
        return
    if args.kind == "photos":
        make_photos(out, args.count, args.classes, cache, args.seed, args.val_fraction)
    elif args.kind == "objects":
        make_objects(out, cache)
    else:
        make_imagenet_layout(out, args.classes, args.per_class, cache, args.seed)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
