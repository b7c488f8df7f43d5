"""Distilling with the teacher cache of random resized crops against running the teacher live, on shards.

A subset of a photo folder (``--images`` images, ``--classes`` classes) is packed into shards; ``kdistill
cache-teacher`` labels ``--views`` crops of every image with the teacher; then the same KD run (random resized crop
+ flip at ``--size``, ``--steps`` steps) trains once with the live teacher and once from the cache. The table gives
the cache build time and both runs' training images/s (the trainer's own count, data loading included) and wall time.
Everything is kept in ``--cache`` and reused, so a rerun only repeats what is missing.

    export CACHE=/path/to/a/cache/folder            # outside the repository; shown as $CACHE in the results
    python benchmarks/photo_folders.py photos --count 5000 --out $CACHE/data13/photos-5000
    python benchmarks/crop_cache.py --folder $CACHE/data13/photos-5000 --cache $CACHE/shards13
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import shown_path

ROOT = Path(__file__).resolve().parents[1]


def kdistill(*args: str) -> float:
    """Run one kdistill command; its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kdistill.cli", *args], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - start


def subset(folder: Path, out: Path, images: int, classes: int) -> Path:
    """``images`` files of the first ``classes`` classes of ``folder/train`` as symlinks (train) and 1 per class (val)."""
    if out.is_dir():
        return out
    tmp = out.with_name(out.name + ".tmp")
    names = sorted(p.name for p in (folder / "train").iterdir())[:classes]
    per = images // classes
    for name in names:
        files = sorted((folder / "train" / name).iterdir())
        for split, chosen in (("train", files[:per]), ("val", files[per : per + 1])):
            (tmp / split / name).mkdir(parents=True, exist_ok=True)
            for f in chosen:
                (tmp / split / name / f.name).symlink_to(f)
    tmp.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--classes", type=int, default=16)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--teacher", default="torchvision.resnet50")
    parser.add_argument("--student", default="torchvision.resnet18")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "crop_cache.md")
    args = parser.parse_args()

    work = args.cache / f"crop-cache-{args.images}-{args.classes}"
    folder = subset(args.folder, work / "folder", args.images, args.classes)
    shards = work / "shards"
    if not (shards / "kdistill.json").is_file():
        kdistill("pack", str(folder), "--out", str(shards))
    common = [f"model={args.student}", f"teacher.model={args.teacher}", "method.name=kd", "data.name=shards",
              f"data.root={shards}", "data.transform=imagenet", f"data.image_size={args.size}", "data.batch_size=32",
              "data.num_workers=2", "trainer.max_epochs=1", f"trainer.limit_train_batches={args.steps}",
              "trainer.limit_val_batches=1", "trainer.accelerator=cpu", "trainer.progress_bar=false", "seed=0"]
    cache = work / f"teacher-cache-{args.views}"
    record = work / "build-time.json"
    if not (cache / "manifest.json").is_file():
        seconds = kdistill("cache-teacher", *common, "--views", str(args.views), "--topk", "5", "--batch-size", "64",
                           "--out", str(cache))
        record.write_text(json.dumps({"wall_s": seconds}))
    build = json.loads(record.read_text())["wall_s"]
    rows = {}
    for name, extra in (("live teacher", []), ("crop cache", [f"teacher.cache={cache}"])):
        out = work / f"run-{name.replace(' ', '-')}"
        if not (out / "metrics.json").is_file():
            kdistill("distill", *common, *extra, f"output={out}")
        rows[name] = json.loads((out / "metrics.json").read_text())

    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Distilling from the crop cache against the live teacher",
        "",
        f"Command: `python benchmarks/crop_cache.py --folder {shown_path(args.folder)} --cache {shown_path(args.cache)} "
        f"--images {args.images} --classes {args.classes} --views {args.views} --size {args.size} --steps {args.steps} "
        f"--teacher {args.teacher} --student {args.student}`",
        "",
        f"KD, {args.teacher} -> {args.student} (random initialisation), {args.images} photos in {args.classes} classes "
        f"packed as shards, random resized crop + flip at {args.size}, batch 32, 2 workers, {args.steps} steps, CPU.",
        f"Machine: {os.cpu_count()} cores, no GPU; load after the runs: `{load}` (other work shared the machine).",
        "",
        f"Building the cache ({args.views} crops per image, top-5 labels): {build:.0f} s wall, start-up included.",
        "",
        "| run | train images/s | train seconds |",
        "|---|---|---|",
    ]
    for name, m in rows.items():
        lines.append(f"| {name} | {m['train_images_per_s']:.1f} | {m['train_seconds']:.1f} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
