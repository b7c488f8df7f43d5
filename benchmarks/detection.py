"""Detection benchmark: ReviewKD on torchvision Mask R-CNN, synthetic shapes and real COCO files.

Parts (each cached under ``--cache``; a finished run is reused, an interrupted one resumes from its
last checkpoint, finished rows are kept in the JSON beside the table):

1. ``accuracy``: a teacher trained here on the synthetic COCO-format shapes set (``kdistill train
   task=detection``), then a plain student and a ReviewKD student with the same budget (steps,
   optimiser, seed, data); box AP and mask AP of each on the validation split (pycocotools).
2. ``speed``: in one process, the thread-CPU time and wall time of a ReviewKD training step against
   a plain student step plus one teacher backbone+FPN pass, interleaved rounds, medians.
3. ``coco128``: one short run of each detector kind (Faster R-CNN, Mask R-CNN, RetinaNet) on the
   real ``coco128-seg`` files (../shared/data, skipped when absent): train, evaluate with
   pycocotools, export.

    python benchmarks/detection.py --threads 1                  # everything
    python benchmarks/detection.py --threads 1 --parts speed
    python benchmarks/detection.py --threads 1 --parts accuracy --rows student reviewkd --seed 1

``--seed`` changes the training seed of the student rows (initialisation, sampling order, RPN/RoI
sampling; the data set and the teacher stay the same); rows of a seed other than 0 are named
``student-seed<N>`` and ``reviewkd-seed<N>``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED = ROOT.parent / "shared"
COMMAND = "python benchmarks/detection.py"

TEACHER = "maskrcnn_resnet34_fpn"
STUDENT = "maskrcnn_resnet18_fpn"
ROW_ORDER = ("teacher", "student", "reviewkd")
LOSS_WEIGHT = 1.5  # the paper's value for its Mask R-CNN R101 -> R18 pair
IMAGE = 128
DETECTOR = ["slim=true", "norm=batchnorm", "trainable_layers=5",
            f"kwargs={{min_size: {IMAGE}, max_size: {IMAGE}, box_detections_per_img: 30}}"]


def uptime() -> str:
    """The machine load (``uptime``) at this moment."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "unknown"


def data_overrides(args: argparse.Namespace) -> list[str]:
    return ["task=detection", "data.name=synthetic", f"data.train_size={args.train_size}",
            f"data.val_size={args.val_size}", f"data.image_size=[{IMAGE}, {IMAGE}]", "data.batch_size=4",
            "data.eval_batch_size=4", "data.max_objects=4", "trainer.accelerator=cpu", "trainer.progress_bar=false",
            "optim.lr=0.01", "optim.warmup_iters=50", "trainer.gradient_clip_val=5.0", "optim.weight_decay=0.0001", "seed=0", "data.seed=0"]


def detector(role: str, model: str) -> list[str]:
    return [f"{role}.model={model}"] + [f"{role}.{o}" for o in DETECTOR]


def run_cli(argv: list[str], out: Path, log: Path) -> dict[str, Any]:
    """Run ``kdistill`` in its own process unless ``out`` already holds a finished run; resume a
    started one. Returns its metrics (``metrics.json``)."""
    metrics = out / "metrics.json"
    if metrics.is_file():
        return json.loads(metrics.read_text())
    # resume a started run; a folder left by a run killed before its first checkpoint is moved aside
    resume = ["--resume"] if (out / "checkpoints" / "last.ckpt").is_file() else \
        ["--overwrite"] if out.is_dir() and any(out.iterdir()) else []
    cmd = [sys.executable, "-m", "kdistill.cli", *argv, f"output={out}", *resume]
    print("$", " ".join(cmd[2:]), flush=True)
    with open(log, "a") as fh:
        subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT)
    return json.loads(metrics.read_text())


def wait_for(path: Path, minutes: float) -> None:
    """Wait until another process of this benchmark has written ``path`` (rows run in parallel)."""
    deadline = time.time() + 60 * minutes
    while not path.is_file():
        if time.time() > deadline:
            raise SystemExit(f"{path} did not appear within {minutes} minutes")
        time.sleep(30)


def part_accuracy(args: argparse.Namespace, cache: Path, record: dict[str, Any]) -> None:
    base = data_overrides(args)
    steps = args.train_size // 4
    rows = record.setdefault("accuracy", {})
    teacher_dir = cache / "teacher"
    common = [*base, *detector("student", STUDENT), f"trainer.max_epochs={args.student_epochs}",
              f"optim.milestones=[{args.student_epochs - 1}]", f"seed={args.seed}"]
    suffix = f"-seed{args.seed}" if args.seed else ""
    if "teacher" in args.rows:
        t = run_cli(["train", *base, *detector("student", TEACHER), f"trainer.max_epochs={args.teacher_epochs}",
                     f"optim.milestones=[{args.teacher_epochs - 1}]"], teacher_dir, cache / "teacher.log")
        rows["teacher"] = {"model": TEACHER, "steps": steps * args.teacher_epochs, **t}
    if "student" in args.rows:
        s = run_cli(["train", *common], cache / f"student{suffix}", cache / f"student{suffix}.log")
        rows[f"student{suffix}"] = {"model": STUDENT, "steps": steps * args.student_epochs, "seed": args.seed, **s,
                                    "losses": loss_curve(cache / f"student{suffix}")}
    if "reviewkd" in args.rows:
        wait_for(teacher_dir / "metrics.json", args.wait_minutes)
        r = run_cli(["distill", *common, "method.name=reviewkd", f"method.options.loss_weight={LOSS_WEIGHT}",
                     *detector("teacher", TEACHER), f"teacher.checkpoint={teacher_dir / 'student.safetensors'}"],
                    cache / f"reviewkd{suffix}", cache / f"reviewkd{suffix}.log")
        rows[f"reviewkd{suffix}"] = {"model": STUDENT, "steps": steps * args.student_epochs, "seed": args.seed, **r,
                                     "losses": loss_curve(cache / f"reviewkd{suffix}")}


def loss_curve(run: Path) -> dict[str, list[float]]:
    """Per-epoch means of every logged training loss (from the run's CSV log)."""
    import csv

    path = run / "logs" / "metrics.csv"
    curves: dict[str, list[float]] = {}
    with open(path) as fh:
        for row in csv.DictReader(fh):
            for key, value in row.items():
                if key.startswith("train/") and key.endswith("_epoch") and value:
                    curves.setdefault(key.removeprefix("train/").removesuffix("_epoch"), []).append(
                        round(float(value), 4))
    return curves


def part_speed(args: argparse.Namespace, record: dict[str, Any]) -> None:
    from kdistill.detection import ReviewKDDetection, SyntheticShapesCOCO, build_detector, collate

    def make(name: str) -> torch.nn.Module:
        return build_detector(name, 4, slim=True, norm="batchnorm", trainable_layers=5, min_size=IMAGE,
                              max_size=IMAGE)

    torch.manual_seed(0)
    student, teacher = make(STUDENT), make(TEACHER)
    distiller = ReviewKDDetection(student, teacher, loss_weight=LOSS_WEIGHT, probe_size=(IMAGE, IMAGE)).train()
    ds = SyntheticShapesCOCO(4, image_size=(IMAGE, IMAGE), seed=7)
    images, targets = collate([ds[i] for i in range(2)])
    opt = torch.optim.SGD(distiller.trainable_parameters(), lr=1e-4, momentum=0.9)

    def student_step() -> None:
        torch.manual_seed(1)
        opt.zero_grad()
        sum(student(images, targets).values()).backward()
        opt.step()

    batch = student.transform(images, targets)[0]  # the student's padded batch, as the distiller captures it

    def teacher_pass() -> None:
        distiller.teacher_features(batch.tensors, batch.image_sizes)

    def review_step() -> None:
        torch.manual_seed(1)
        opt.zero_grad()
        sum(distiller(images, targets).values()).backward()
        opt.step()

    fns = {"student_step": student_step, "teacher_backbone": teacher_pass, "reviewkd_step": review_step}
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, dict[str, list[float]]] = {k: {"cpu": [], "wall": []} for k in fns}
    load_before = uptime()
    for _ in range(args.speed_rounds):
        for name, fn in fns.items():
            c0, w0 = time.thread_time(), time.perf_counter()
            fn()
            times[name]["cpu"].append(time.thread_time() - c0)
            times[name]["wall"].append(time.perf_counter() - w0)
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in times.items()}
    ratio = {m: med["reviewkd_step"][m] / (med["student_step"][m] + med["teacher_backbone"][m]) for m in ("cpu", "wall")}
    record["speed"] = {"rounds": args.speed_rounds, "median_seconds": med, "ratio": ratio, "load_before": load_before,
                       "load_after": uptime(), "batch": "2 images, 128x128", "teacher": TEACHER, "student": STUDENT,
                       "abf_parameters": distiller.extra_parameters()}


def part_coco128(args: argparse.Namespace, cache: Path, record: dict[str, Any]) -> None:
    archive = SHARED / "data" / "coco128-seg.tar.gz"
    if not archive.is_file():
        record["coco128"] = {"skipped": f"{archive} is missing"}
        return
    from kdistill.detection.data import unpack_cached

    root = unpack_cached(archive) / "coco128-seg"
    rows = record.setdefault("coco128", {})
    for model in ("fasterrcnn_mobilenet_v2_fpn", "maskrcnn_resnet18_fpn", "retinanet_resnet18_fpn"):
        out = cache / f"coco128-{model}"
        argv = ["train", "task=detection", "data.name=coco", f"data.root={root}", "data.batch_size=2",
                "data.eval_batch_size=4", f"model={model}", "student.slim=true",
                "student.kwargs={min_size: 320, max_size: 416, box_detections_per_img: 20}",
                "trainer.max_epochs=1", "trainer.limit_train_batches=10", "trainer.accelerator=cpu",
                "trainer.progress_bar=false", "optim.lr=0.005", "optim.warmup_iters=5"]
        start = time.perf_counter()
        metrics = run_cli(argv, out, cache / f"coco128-{model}.log")
        train_s = time.perf_counter() - start
        eval_out = subprocess.run([sys.executable, "-m", "kdistill.cli", "eval", str(out)], check=True,
                                  capture_output=True, text=True).stdout.strip().splitlines()[-1]
        export = cache / f"coco128-{model}-export.safetensors"
        if not export.exists():
            subprocess.run([sys.executable, "-m", "kdistill.cli", "export", str(out), "--out", str(export)],
                           check=True, capture_output=True)
        rows[model] = {"train_metrics": metrics, "eval": json.loads(eval_out), "export_bytes": export.stat().st_size,
                       "wall_seconds_incl_cached": round(train_s, 1)}


def seed_gains(acc: dict[str, Any]) -> list[str]:
    """One line per seed with both student rows: ReviewKD minus the plain student, then the mean."""
    lines, gains = [], []
    for seed in sorted({r.get("seed", 0) for r in acc.values()}):
        suffix = f"-seed{seed}" if seed else ""
        s, r = acc.get(f"student{suffix}"), acc.get(f"reviewkd{suffix}")
        if s and r:
            gain = (100 * (r["bbox_AP"] - s["bbox_AP"]), 100 * (r.get("segm_AP", 0) - s.get("segm_AP", 0)))
            gains.append(gain)
            lines.append(f"Seed {seed}: ReviewKD minus the plain student: {gain[0]:+.2f} box AP, {gain[1]:+.2f} mask "
                         "AP (the final epoch's checkpoint of each run).")
        elif s or r:
            lines.append(f"Seed {seed}: only one of the two student rows had finished when this table was written; "
                         "the same command resumes the other from its last checkpoint.")
        lines.append("")
    if len(gains) > 1:
        lines.append(f"Mean over {len(gains)} seeds: {statistics.mean(g[0] for g in gains):+.2f} box AP, "
                     f"{statistics.mean(g[1] for g in gains):+.2f} mask AP.")
    return lines


def render(record: dict[str, Any], args: argparse.Namespace) -> str:
    commands = []
    for argv in record.get("runs") or [record["argv"]]:
        shown = [a for i, a in enumerate(argv) if a != "--out" and (i == 0 or argv[i - 1] != "--out")]
        commands.append(f"`{COMMAND} {' '.join(shown)}`")
    lines = ["# Detection benchmark (CPU)", "",
             "Commands (from the repository root; `KDISTILL_CACHE` names the cache folder; parts and rows ran in "
             "separate processes, some in parallel): " + ", ".join(commands) + ".", "",
             *([record["notes"], ""] if record.get("notes") else []),
             f"Machine: {record['machine']}; torch {record['torch']}. Load when the run started: "
             f"`{record['load_start']}`; when the table was written: `{uptime()}`.", ""]
    acc = record.get("accuracy")
    if acc:
        lines += ["## Synthetic shapes: teacher, plain student, ReviewKD student", "",
                  f"Synthetic COCO-format shapes (3 classes, {args.train_size} train / {args.val_size} val images, "
                  f"{IMAGE}x{IMAGE}, up to 4 objects), Mask R-CNN with slim heads, BatchNorm backbones trained "
                  f"from random initialisation, batch 4, SGD lr 0.01 with 50 warm-up iterations, gradients clipped at norm 5, x0.1 for the "
                  f"last epoch. ReviewKD: lambda = {LOSS_WEIGHT}, 5 FPN levels, 3,286,024 ABF parameters.", "",
                  "| row | model | steps | box AP | box AP50 | mask AP | mask AP50 | train s |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in sorted(acc.items(), key=lambda kv: (kv[1].get("seed", 0), ROW_ORDER.index(kv[0].split("-seed")[0]))):
            if r:
                lines.append(f"| {name} | {r['model']} | {r['steps']} | {100 * r['bbox_AP']:.2f} | "
                             f"{100 * r['bbox_AP50']:.2f} | {100 * r.get('segm_AP', float('nan')):.2f} | "
                             f"{100 * r.get('segm_AP50', float('nan')):.2f} | {r['train_seconds']:.0f} |")
        lines += [""] + seed_gains(acc)
        for name in sorted(acc):
            if name != "teacher":
                lines += ["", f"Per-epoch training losses, {name}: `{json.dumps(acc[name]['losses'])}`"]
        lines.append("")
    sp = record.get("speed")
    if sp:
        m = sp["median_seconds"]
        lines += ["## Step time", "",
                  f"{sp['student']} student, {sp['teacher']} teacher, {sp['batch']}, medians of {sp['rounds']} "
                  "interleaved rounds in one process (thread-CPU time and wall time).", "",
                  "| what | thread-CPU s | wall s |", "|---|---|---|"]
        for key in ("student_step", "teacher_backbone", "reviewkd_step"):
            lines.append(f"| {key} | {m[key]['cpu']:.3f} | {m[key]['wall']:.3f} |")
        lines += [f"| **ratio** reviewkd / (student + teacher) | **{sp['ratio']['cpu']:.3f}** | "
                  f"**{sp['ratio']['wall']:.3f}** |", "",
                  f"Load before: `{sp['load_before']}`; after: `{sp['load_after']}`.", ""]
    coco = record.get("coco128")
    if coco:
        lines += ["## coco128-seg: one short run per detector kind", ""]
        if "skipped" in coco:
            lines += [f"Skipped: {coco['skipped']}.", ""]
        else:
            lines += ["Real COCO images (100 train / 100 val, 80 classes, polygons), random initialisation, 10 "
                      "training steps of 2 images at 320 px (shorter side), evaluation on all 100 val images with "
                      "pycocotools, export to safetensors. The AP values only show that the pipeline runs "
                      "end to end on real files: 10 steps from scratch cannot detect anything.", "",
                      "| detector | box AP | mask AP | eval images/s | export bytes |", "|---|---|---|---|---|"]
            for model, r in coco.items():
                e = r["eval"]
                mask = f"{100 * e['segm_AP']:.2f}" if "segm_AP" in e else "-"
                lines.append(f"| {model} | {100 * e['bbox_AP']:.2f} | {mask} | {e['images_per_s']:.2f} | "
                             f"{r['export_bytes']:,} |")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["speed", "accuracy", "coco128"],
                        choices=["speed", "accuracy", "coco128", "render"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default=None, help="cache folder (default $KDISTILL_CACHE/bench-detection)")
    parser.add_argument("--train-size", type=int, default=320)
    parser.add_argument("--val-size", type=int, default=64)
    parser.add_argument("--teacher-epochs", type=int, default=4)
    parser.add_argument("--student-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="training seed of the student rows")
    parser.add_argument("--speed-rounds", type=int, default=8)
    parser.add_argument("--rows", nargs="+", default=["teacher", "student", "reviewkd"],
                        choices=["teacher", "student", "reviewkd"], help="accuracy rows run by this process")
    parser.add_argument("--wait-minutes", type=float, default=90, help="how long the reviewkd row waits for a "
                        "teacher trained by another process of this benchmark")
    parser.add_argument("--out", default=str(RESULTS / "detection"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from kdistill.detection.data import default_cache_dir

    cache = Path(args.cache) if args.cache else default_cache_dir() / "bench-detection"
    cache = cache / f"train{args.train_size}-val{args.val_size}-t{args.teacher_epochs}-s{args.student_epochs}"
    cache.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    json_path = out.with_suffix(".json")
    record = json.loads(json_path.read_text()) if json_path.is_file() else {}
    record.update({"argv": sys.argv[1:], "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                   "torch": torch.__version__, "load_start": record.get("load_start") or uptime()})

    def save() -> None:
        # other processes of this benchmark may have saved their parts meanwhile: merge, do not overwrite
        current = json.loads(json_path.read_text()) if json_path.is_file() else {}
        for key, value in record.items():
            if key == "accuracy" and isinstance(current.get(key), dict):
                current[key].update(value)
            elif key not in ("runs", "load_start") or key not in current:
                current[key] = value
        current.setdefault("runs", [])
        if args.parts != ["render"] and sys.argv[1:] not in current["runs"]:
            current["runs"].append(sys.argv[1:])
        record.clear()
        record.update(current)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = json_path.with_name(f".{json_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, json_path)
        md = out.with_suffix(".md")
        tmp = md.with_name(f".{md.name}.{os.getpid()}.tmp")
        tmp.write_text(render(record, args))
        os.replace(tmp, md)

    parts = {"speed": lambda: part_speed(args, record), "accuracy": lambda: part_accuracy(args, cache, record),
             "coco128": lambda: part_coco128(args, cache, record), "render": lambda: None}
    for name in args.parts:
        print(f"== {name} ({uptime()})", flush=True)
        parts[name]()
        save()
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
