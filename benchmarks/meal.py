"""MEAL benchmark: an ensemble of two different teachers, both trained here, distilled into resnet20.

MEAL v1 and MEAL V2 as in docs/methods/meal.md. Stage 1 trains two teachers of different families on the
*full* ``tiny100-32`` train split with the project's own command (``kdistill train``): by default
``cifar.resnet32`` and ``cifar.wrn_16_1`` (a ResNet and a wide ResNet). Stage 2 distils them into ``cifar.resnet20`` on the short
budget of ``benchmarks/accuracy.py`` (50 images per class, 10 epochs, the same optimiser, seed and
val split), with

- ``meal_v1``: one teacher drawn at random per batch (only that teacher runs), logits block,
  soft cross-entropy similarity + discriminator, cooperative (the authors' ensemble command);
- ``meal_v2``: both teachers every step, mean of their probabilities as the target, KL similarity and
  a discriminator on the mean logits (MEAL V2);
- ``kd-best``: KD (T=4) from the better of the two teachers (by its val top-1), the usual baseline;
- ``ce``: the student alone, read from the accuracy benchmark's CE row when its budget matches.

Every row is a ``kdistill`` command run in its own process; teachers and rows are cached (a
finished run folder with the exact configuration is reused; rows are kept in the JSON beside the
table), so an interrupted run resumes where it stopped::

    python benchmarks/meal.py --threads 1                 # teachers, then every row
    python benchmarks/meal.py --threads 1 --stage teachers
    python benchmarks/meal.py --threads 1 --rows meal_v2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch
from accuracy import add_budget_arguments, append_row, common_overrides, finished_run_matches, run_kdistill
from common import RESULTS, ROOT, shown_command, unpack_tiny100

TEACHER_RECIPE = [
    "data.name=imagefolder", "data.batch_size=64", "data.eval_batch_size=500",
    "optim.lr=0.1", "optim.momentum=0.9", "optim.nesterov=true", "optim.weight_decay=5e-4",
    "optim.schedule=cosine", "trainer.progress_bar=false", "method.name=ce", "data.seed=0", "seed=0",
]

ROWS: dict[str, list[str]] = {
    "meal_v1": ["method.name=meal_v1", "method.options.teacher_selection=random"],
    "meal_v2": ["method.name=meal_v2", "method.options.teacher_selection=average"],
    "kd-best": ["method.name=kd"],
}
ORDER = ["ce", "kd-best", "meal_v1", "meal_v2"]


def teacher_argv(model: str, args: argparse.Namespace, data_root: Path) -> list[str]:
    warmup = round(0.15 * args.teacher_epochs, 3)  # one-cycle-like: 15% warm-up, then cosine
    return ["train", *TEACHER_RECIPE, f"data.root={data_root}", f"model={model}",
            f"optim.warmup_epochs={warmup}", f"trainer.max_epochs={args.teacher_epochs}",
            f"output={Path(args.runs) / ('teacher-' + model.split('.')[-1])}"]


def train_teachers(args: argparse.Namespace, data_root: Path, reuse_only: bool = False) -> list[dict]:
    teachers = []
    for model in args.teachers.split(","):
        argv = teacher_argv(model, args, data_root)
        out = Path(argv[-1].split("=", 1)[1])
        if reuse_only and not finished_run_matches(out, argv[1:]):
            sys.exit(f"teacher {model} has no finished run in {out}: run python benchmarks/meal.py --stage teachers")
        metrics, seconds, commit = run_kdistill(argv, out, args.threads, f"teacher {model}")
        print(f"teacher {model}: top-1 {metrics['top1_last']:.2f}% ({f'{seconds / 60:.1f} min' if commit else 'reused'})",
              flush=True)
        teachers.append({"model": model, "checkpoint": str(out / "student.safetensors"), "top1": metrics["top1_last"],
                         "command": shown_command(argv),
                         "minutes": seconds / 60, "threads": args.threads})
    return teachers


def teacher_ensemble_stats(teachers: list[dict], data_root: Path) -> dict:
    """Each teacher's val predictions, recomputed here (a check of the runs' own numbers), and how
    complementary the pool is: how often the teachers agree, and on how many images at least one is right."""
    from kdistill import create_model
    from kdistill.checkpoint import load_weights
    from kdistill.data import BatchAugment
    from kdistill.data.folders import load_image_folder

    train = load_image_folder(data_root / "train")
    val = load_image_folder(data_root / "val", classes=train.classes).tensors
    augment = BatchAugment(*train.tensors.channel_stats(), padding=0, flip=False)
    preds = []
    for t in teachers:
        model = load_weights(create_model(t["model"], num_classes=len(train.classes)), t["checkpoint"]).eval()
        with torch.inference_mode():
            preds.append(torch.cat([model(augment(val.images[i:i + 500], train=False)).argmax(1)
                                    for i in range(0, len(val), 500)]))
    right = [p == val.targets for p in preds]
    return {"images": len(val), "correct": [int(r.sum()) for r in right],
            "all_agree": float(torch.stack([p == preds[0] for p in preds]).all(0).float().mean()),
            "any_right": int(torch.stack(right).any(0).sum())}


def row_argv(name: str, teachers: list[dict], args: argparse.Namespace, data_root: Path) -> list[str]:
    common = [a for a in common_overrides(args, data_root) if not a.startswith("teacher.")]
    if name == "kd-best":
        pool = [max(teachers, key=lambda t: t["top1"])]
    else:
        pool = teachers
    tt = [f"teachers.{i}.model={t['model']}" for i, t in enumerate(pool)]
    tt += [f"teachers.{i}.checkpoint={t['checkpoint']}" for i, t in enumerate(pool)]
    return ["distill", *common, *tt, *ROWS[name], "data.seed=0", "seed=0",
            f"output={Path(args.runs) / name}"]


def write_table(rows: list[dict], teachers: list[dict], args: argparse.Namespace, path: Path, stats: dict | None = None) -> None:
    by = {r["method"]: r for r in rows}
    ce = by.get("ce")
    lines = [
        "# MEAL benchmark: two different teachers → resnet20 on tiny100-32",
        "",
        f"- Teachers: trained here with `kdistill train` on the full tiny100-32 train split (50,000 images), "
        f"{args.teacher_epochs} epochs, batch 64, SGD Nesterov lr 0.1, 15% warm-up then cosine, wd 5e-4, pad-4 crop + flip, seed 0.",
        f"- Student: cifar.resnet20 on {args.per_class} train images per class (the budget of benchmarks/accuracy.py): "
        f"{args.epochs} epochs, batch 64, SGD Nesterov lr 0.05, cosine with 1 warm-up epoch, wd 5e-4, seed 0; "
        "top-1 on the full val split (5,000) at the last and the best epoch.",
        f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}; "
        "OMP_NUM_THREADS per command below; another benchmark shared the machine, so times compare within this table only.",
        f"- Reproduce: `python benchmarks/meal.py --threads {args.threads} --teacher-epochs {args.teacher_epochs} "
        f"--per-class {args.per_class} --epochs {args.epochs}` (resumable).",
        "",
        "- `kd-best`: KD (T=4, the KD row of benchmarks/accuracy.py) from the teacher with the higher val top-1; on a tie, "
        "the first one listed.",
        "",
        "| teacher | val top-1 (%) | train minutes |",
        "|---|---|---|",
    ]
    lines += [f"| {t['model']} | {t['top1']:.2f} | {t['minutes']:.1f} |" for t in teachers]
    if stats:
        lines += ["", f"Recomputed from the teacher checkpoints on the {stats['images']:,} val images: "
                  f"{' and '.join(str(c) for c in stats['correct'])} correct; the teachers' top-1 predictions agree on "
                  f"{100 * stats['all_agree']:.1f}% of the images, and at least one teacher is right on {stats['any_right']:,} "
                  f"({100 * stats['any_right'] / stats['images']:.2f}%): the pool knows more than either member, "
                  "which is what an ensemble method can transfer."]
    lines += ["", "| student row | teachers | top-1 last (%) | top-1 best (%) | Δ last vs student alone | train images/s | peak memory (MiB) |",
              "|---|---|---|---|---|---|---|"]
    for name in [n for n in ORDER if n in by]:
        r = by[name]
        delta = f"{r['top1_last'] - ce['top1_last']:+.2f}" if ce else "—"
        lines.append(f"| {name} | {r['teachers']} | {r['top1_last']:.2f} | {r['top1_best']:.2f} | {delta} | "
                     f"{r.get('train_images_per_s', 0):.0f} | {r.get('peak_memory_mb', 0):.0f} |")
    if all(n in by for n in ("kd-best", "meal_v1", "meal_v2")):
        lines += ["", "Reading the rows: the rows differ in more than the teachers. `kd-best` is the KD row of the "
                  "accuracy benchmark (T = 4, 0.9 · KD + 0.1 · cross-entropy on the labels); the MEAL rows use the "
                  "published settings (docs/methods/meal.md): soft cross-entropy at T = 1 plus the discriminator, and **no hard "
                  "labels**. With teachers right on 19% of val images (25% for the pair), the labels carry information "
                  "the teachers lack, which only the KD row uses; a MEAL row with `hard_label_weight=1` would separate "
                  "that effect (not run: budget). One seed per row; the seed-to-seed spread was not measured, so "
                  "differences of a point or two are not established."]
    if ce and ce.get("peak_memory_mb", 0) > 2900:
        lines += ["", "The `ce` row's peak memory includes a 2.4 GB transient of the channel-statistics code it ran with "
                  "(fixed in commit 51dad76, see the note in accuracy_tiny100.md); the other rows ran after the fix."]
    lines += ["", "## Commands", ""]
    lines += [f"- teacher {t['model']} ({t['minutes']:.1f} min, OMP_NUM_THREADS={t['threads']}): `{t['command']}`"
              for t in teachers]
    lines += [f"- {n} ({by[n]['minutes']:.1f} min, OMP_NUM_THREADS={by[n]['threads']}): `{by[n]['command']}`"
              for n in ORDER if n in by]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", default="cifar.resnet32,cifar.wrn_16_1")
    p.add_argument("--teacher-epochs", type=int, default=2)
    p.add_argument("--rows", default=",".join(ORDER))
    p.add_argument("--stage", choices=["all", "teachers"], default="all")
    add_budget_arguments(p)
    p.add_argument("--runs", default=str(ROOT / "runs" / "bench-meal"))
    p.add_argument("--name", default="meal_tiny100")
    p.add_argument("--table-only", action="store_true", help="rewrite the table from the cached rows and teachers")
    args = p.parse_args()
    args.teacher = ""  # common_overrides() names a teacher checkpoint; this benchmark trains its own teachers
    data_root = unpack_tiny100(Path(args.cache) / "data")
    RESULTS.mkdir(parents=True, exist_ok=True)
    cache_file = RESULTS / f"{args.name}.json"
    if args.table_only:  # teachers must be finished (reused, never trained here)
        teachers = train_teachers(args, data_root, reuse_only=True)
        write_table(json.loads(cache_file.read_text()), teachers, args, RESULTS / f"{args.name}.md",
                    teacher_ensemble_stats(teachers, data_root))
        return
    teachers = train_teachers(args, data_root)
    if args.stage == "teachers":
        return
    rows = json.loads(cache_file.read_text()) if cache_file.is_file() else []
    for name in args.rows.split(","):
        if name not in [*ROWS, "ce"]:
            sys.exit(f"unknown row {name!r}; rows: {', '.join(ORDER)}")
        if name == "ce":
            # The student alone does not depend on the teachers: the accuracy benchmark's CE row, same budget.
            acc = RESULTS / "accuracy_tiny100.json"
            ce = [r for r in json.loads(acc.read_text()) if r["method"] == "ce" and r["seed"] == 0
                  and r.get("budget") == {"per_class": args.per_class, "epochs": args.epochs}] if acc.is_file() else []
            if not ce:
                sys.exit("no CE row with this budget in accuracy_tiny100.json: run "
                         f"python benchmarks/accuracy.py --methods ce --per-class {args.per_class} --epochs {args.epochs}")
            rows = append_row(cache_file, {**{k: v for k, v in ce[0].items() if k != "history"}, "teachers": "—",
                                           "minutes": ce[0]["wall_seconds"] / 60, "threads": ce[0]["threads"]})
            continue
        argv = row_argv(name, teachers, args, data_root)
        metrics, seconds, commit = run_kdistill(argv, Path(argv[-1].split("=", 1)[1]), args.threads, f"row {name}")
        pool = [t["model"] for t in teachers] if name != "kd-best" else [max(teachers, key=lambda t: t["top1"])["model"]]
        row = {"method": name, "seed": 0, "teachers": " + ".join(pool), "minutes": seconds / 60, "threads": args.threads,
               **({"commit": commit} if commit else {}),
               "command": shown_command(argv),
               **{k: v for k, v in metrics.items() if k != "history"}, "history": metrics["history"]}
        rows = append_row(cache_file, row)
        write_table(rows, teachers, args, RESULTS / f"{args.name}.md")
        print(f"  {name}: top-1 last {row['top1_last']:.2f}  best {row['top1_best']:.2f}", flush=True)
    rows = json.loads(cache_file.read_text()) if cache_file.is_file() else rows
    write_table(rows, teachers, args, RESULTS / f"{args.name}.md", teacher_ensemble_stats(teachers, data_root))


if __name__ == "__main__":
    main()
