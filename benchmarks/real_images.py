"""A short run on real photographs at their own sizes: a teacher, the student alone and a KD student, streamed.

The data are the COCO objects of ``../shared/data/coco128-seg.tar.gz`` cropped into one folder per category
(``benchmarks/photo_folders.py objects``: 27 categories with at least 8 objects, every fourth object of a category in
``val/``); every image keeps its own size and aspect ratio. All three runs read the folder per sample
(``data.in_memory=false``, DataLoader workers) with the ``imagenet`` transform at ``--size``; mean and standard
deviation are the training split's, estimated by kdistill. Finished runs are reused (resumable).

    python benchmarks/photo_folders.py objects --out /work/cache/data13/coco-objects
    python benchmarks/real_images.py --data /work/cache/data13/coco-objects --runs /work/cache/data13/real-runs
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections import Counter
from pathlib import Path

from accuracy import run_kdistill
from common import ROOT, machine_line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--runs", required=True, help="run folders (reused when finished with the same command)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--teachers", nargs="+", default=["cifar.resnet32", "cifar.wrn_16_2"],
                        help="each is trained, then distilled into the student with KD")
    parser.add_argument("--student", default="cifar.resnet8")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "real-images-coco-objects"))
    args = parser.parse_args()
    data, runs = Path(args.data), Path(args.runs)
    common = ["data.name=imagefolder", f"data.root={data}", "data.transform=imagenet", f"data.image_size={args.size}",
              "data.in_memory=false", f"data.num_workers={args.workers}", "data.batch_size=32", "data.eval_batch_size=64",
              "optim.lr=0.05", "optim.momentum=0.9", "optim.nesterov=true", "optim.weight_decay=5e-4",
              "optim.schedule=cosine", "optim.warmup_epochs=1", f"trainer.max_epochs={args.epochs}",
              "trainer.progress_bar=false", "seed=0"]
    rows = {}
    plan = [("teacher" if i == 0 else f"teacher {i + 1}", "train", t, []) for i, t in enumerate(args.teachers)]
    plan.append(("student alone", "train", args.student, []))
    for i, t in enumerate(args.teachers):
        folder = runs / ("teacher" if i == 0 else f"teacher-{i + 1}")
        plan.append(("KD student" if i == 0 else f"KD student from teacher {i + 1}", "distill", args.student,
                     ["method.name=kd", f"teachers.0.model={t}", f"teachers.0.checkpoint={folder / 'student.safetensors'}"]))
    for label, command, model, extra in plan:
        out = runs / label.replace(" ", "-")
        argv = [command, f"model={model}", *common, *extra, f"output={out}"]
        metrics, seconds, commit = run_kdistill(argv, out, args.threads, label)
        card = json.loads((out / "run.json").read_text())
        rows[label] = {"model": model, "top1_best": metrics["top1_best"], "top1_last": metrics["top1_last"],
                       "top5_last": metrics["top5_last"], "seconds": seconds, "commit": commit,
                       "train_images_per_s": metrics["train_images_per_s"], "storage": card.get("data_storage"),
                       "command": "kdistill " + shlex.join(argv)}
    val = Counter(p.parent.name for p in (data / "val").rglob("*.jpg"))
    train = Counter(p.parent.name for p in (data / "train").rglob("*.jpg"))
    majority = max(val.values()) / sum(val.values()) * 100
    sizes = json.loads((data / "folder.json").read_text())
    storage = rows["teacher"]["storage"] or {}
    lines = ["# Real photographs at their own sizes, streamed: teacher, student alone, KD student", "",
             f"Machine: {machine_line()}; load average at the end {os.getloadavg()[0]:.1f} (2 cores, shared)", "",
             f"Data: COCO objects cropped into {len(train)} category folders ({sum(train.values())} training, "
             f"{sum(val.values())} validation images at their own sizes; {sizes['min_side']} px or more a side), "
             f"streamed per sample ({'in memory' if storage.get('in_memory') else 'streamed'}: "
             f"data.in_memory={storage.get('setting')}) with the imagenet transform at {args.size} px (random resized "
             f"crop + flip; validation: shorter side to {int(args.size / 0.875)}, centre crop). The largest category "
             f"('person') is {majority:.1f} % of the validation split: the accuracy of always answering it.",
             f"{args.epochs} epochs each, batch 32, SGD lr 0.05 (cosine, 1 warm-up epoch), Nesterov, weight decay 5e-4, "
             f"{args.workers} DataLoader workers, {args.threads} thread.", "",
             "| run | network | top-1 % (best epoch) | top-1 % (last) | top-5 % (last) | train images/s | minutes |",
             "|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['model']} | {r['top1_best']:.2f} | {r['top1_last']:.2f} | {r['top5_last']:.2f} | "
                     f"{r['train_images_per_s']:.0f} | {r['seconds'] / 60:.1f} |")
    alone = rows["student alone"]["top1_last"]
    gains = ", ".join(f"{label} ({rows[label.replace('KD student from ', '').replace('KD student', 'teacher')]['model']}) "
                      f"{rows[label]['top1_last'] - alone:+.2f}" for label in rows if label.startswith("KD"))
    lines += ["", f"KD against the student alone, top-1 of the last epoch: {gains} points; one seed, {sum(val.values())} "
              f"validation images (one image is {100 / sum(val.values()):.2f} points). With so few training images the "
              "larger networks fit the training split far better than the validation split and can end below the "
              "student alone; a KD student gains only from a teacher better than itself. These runs show the "
              "streamed real-image path training end to end; they are not a distillation benchmark.", "",
              "Commands:", ""]
    lines += [f"    {r['command']}" for r in rows.values()]
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"command": "python benchmarks/real_images.py " + shlex.join(sys.argv[1:]),
                                                     "rows": rows}, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
