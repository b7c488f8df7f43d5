"""Accuracy harness: every method on the same short budget of real data, same teacher checkpoint.

Data: ``tiny100-32`` (100 classes, 32×32 real photographs, ../shared/data), a class-balanced
subset of the train split, the full val split. Teacher: the shared resnet56 checkpoint (51.02%
top-1 on val; shared CIFAR checkpoint layout). Student: cifar.resnet20. Every row runs the
``kdistill distill`` (or ``train``) command printed in the table, in its own process (clean peak
memory), and is cached in the JSON beside the table, so an interrupted run resumes where it
stopped. Budget-dependent settings (warm-up lengths scaled from 240 to the short budget) are listed
with each row.

    python benchmarks/accuracy.py                       # all rows, default budget
    python benchmarks/accuracy.py --methods ce,kd,reviewkd --seeds 0
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import RESULTS, ROOT, SHARED, shown_command, unpack_tiny100

from kdistill.files import atomic_write_text

# Method rows: overrides on top of the common budget. Warm-ups that the 240-epoch recipes set to
# 20 epochs are scaled to the short budget (20/240 of it, rounded up to 1 epoch).
ROWS: dict[str, list[str]] = {
    "ce": ["method.name=ce"],
    "kd": ["method.name=kd"],
    "reviewkd": ["method.name=reviewkd", "method.options.loss_weight=0.6", "method.options.warmup_epochs=1"],
    "dkd": ["method.name=dkd", "method.options.beta=2.0", "method.options.warmup_epochs=1"],
    "fitnet": ["method.name=fitnet"],
    "at": ["method.name=at"],
    "sp": ["method.name=sp"],
    "rkd": ["method.name=rkd"],
    "pkt": ["method.name=pkt"],
    "nst": ["method.name=nst"],
    "crd": ["method.name=crd"],
    "vid": ["method.name=vid"],
    "hkd": ["method.name=hkd"],
    # diagnostic: HKD with CRD's memory momentum (0.5), to test whether the banks' slow forgetting of their
    # random initialisation at momentum 0.9 explains the hkd row
    "hkd_m05": ["method.name=hkd", "method.options.momentum=0.5"],
    # diagnostic: HKD with its contrastive terms weighted as CRD's (0.8 instead of 3)
    "hkd_b08": ["method.name=hkd", "method.options.hkd_weight=0.8"],
}
# Execution modes (``<method>@<mode>`` rows): the same run with the step compiled and/or in bf16
# mixed precision; ``eager`` reruns the plain row under its own name (on the current machine).
MODES: dict[str, list[str]] = {
    "eager": [],
    "compiled": ["trainer.compile=true"],
    "bf16": ["trainer.precision=bf16-mixed"],
    "compiled+bf16": ["trainer.compile=true", "trainer.precision=bf16-mixed"],
}
DEFAULT_ORDER = ["ce", "kd", "reviewkd", "dkd", "crd", "fitnet", "at", "sp", "pkt", "rkd", "nst", "vid", "crd_kd", "hkd"]
ROWS["crd_kd"] = ["method.name=crd_kd"]

# What a reader needs to interpret a row, shown under the table when the row is present. Numbers
# come from the run's own logs (runs/bench-accuracy/<row>/logs/metrics.csv, per-step loss terms).
NOTES: dict[str, str] = {
    "hkd": (
        "**HKD far below the student alone at this budget, and why.** Its two contrastive terms (β = 3, K = 4,950 "
        "negatives of other classes: the 16,384 of the recipe exceed the 5,000-image bank) are 13 times the "
        "cross-entropy for the whole run: weighted individual term 58.1 in epoch 1 and 58.9 in epoch 10 (unweighted "
        "19.6, against 2·ln(4,951) = 17.0 for uninformative scores), holistic 27.8 → 24.5, while the cross-entropy "
        "stays at chance (4.6 = ln 100) for four epochs and ends at 4.41 (the student alone: 3.58). At the first step "
        "the two terms' gradients on the student's layers have norms 12.0 and 6.3 against 1.6 for the cross-entropy "
        "(CRD's term: 3.4; `python benchmarks/loss_gradients.py`). Two diagnostic rows test the explanations. "
        "*hkd_m05* (memory momentum 0.5, as CRD's, so the banks forget their random initialisation within a few "
        "epochs instead of keeping 0.9^10 ≈ 35% of it after ten) is worse, 2.48%: the student's own bank, which "
        "supplies the negatives, fills at once with its current, nearly identical embeddings, and the individual term "
        "starts even higher (weighted 93 in epoch 1). *hkd_b08* (the contrastive terms weighted 0.8, CRD's weight, "
        "instead of 3) reaches 8.36% (best 8.84) with a cross-entropy of 3.77 in epoch 10, while its individual term "
        "still does not fall (unweighted 19.4 → 19.9). So the weight of the contrastive terms, not the bank's "
        "refresh, holds the student back at 10 epochs. Not a defect of the implementation as far as checked "
        "against the authors' code: the weights (γ = 1, β = 3, α = 0), τ = 0.07, momentum 0.9, the bank "
        "initialisation (uniform, as CRD's), the positives (the other network's stored row; for the holistic term "
        "0.75 of it plus 0.25 of the other network's graph embedding) and negatives (the anchor's own bank, other "
        "classes) and the graph (8 neighbours by cosine distance of the softmax outputs, 1-hop TAGConv with "
        "symmetric normalisation) are theirs. HKD is a 240-epoch method; this table cannot rank it."
    ),
    "fitnet": (
        "**FitNet is the best row here**, while at 240 epochs on full CIFAR-100 it barely beats the student alone "
        "(69.21 vs 69.06, Tian et al., ICLR 2020, Table 1). This budget is a low-data regime (50 images per class; the teacher saw "
        "500): a dense per-position target for the student's middle stage, from features learned on ten times more "
        "images, is plausibly worth more here than with the full data. One seed; the ranking between FitNet, NST, "
        "DKD and ReviewKD at this budget is not established beyond it."
    ),
    "rkd": (
        "**RKD below the student alone.** Its relational term (25 · distance + 50 · angle on the penultimate "
        "embeddings; 2.10 in epoch 1, 1.17 in epoch 10) is as large as the cross-entropy and pulls the student toward "
        "the teacher's sample geometry before it can classify: the run's train cross-entropy is 4.54 in epoch 4 and "
        "4.08 in epoch 10, against 4.17 and 3.58 for the student alone (means of the logged steps). At 240 epochs the published gain is small "
        "(+0.55 points for resnet56 → resnet20, Tian et al., ICLR 2020, Table 1) and negative for resnet32x4 → resnet8x4 (71.90 vs "
        "72.50), so a short budget that leaves the cross-entropy behind shows RKD at its worst."
    ),
    "crd": (
        "**CRD ≈ the student alone at this budget, and why.** The contrastive term is far from converged after "
        "10 epochs. With K = 4,999 negatives (the bank holds the 5,000 training images; the recipe's 16,384 is "
        "clipped to N − 1) the NCE loss at chance is 2·(ln(K+1) + 1) ≈ 19.0 (student and teacher anchors); the run's "
        "unweighted CRD loss averages 19.8 in epoch 1 and 14.4 in epoch 10, so the student embedding picks its own "
        "teacher embedding out of the bank only a little better than chance. Within every epoch the loss falls and "
        "at the next epoch start it jumps back (weighted term: 20.8 → 13.5 in epoch 2, 15.9 → 12.6 in epoch 4), "
        "the signature of the memory bank: each row is rewritten once per epoch (every 79 steps, momentum 0.5), so "
        "the positives and most negatives are embeddings of an older network while the student moves fast at lr 0.05. "
        "In 10 epochs every row is written 10 times; the published CRD runs 240 epochs over a 50,000-row bank. "
        "The cross-entropy part ends where the student alone ends (3.61 vs 3.58 in the last epoch, means of the logged steps), so the term "
        "neither helped nor hurt here. CRD needs a long schedule; the short-budget table does not rank it fairly."
    ),
}


def common_overrides(args: argparse.Namespace, data_root: Path) -> list[str]:
    return [
        "data.name=imagefolder", f"data.root={data_root}", f"data.train_per_class={args.per_class}",
        "data.batch_size=64", "data.eval_batch_size=500",
        "model=cifar.resnet20", "teacher.model=cifar.resnet56", f"teacher.checkpoint={args.teacher}",
        "optim.lr=0.05", "optim.momentum=0.9", "optim.nesterov=true", "optim.weight_decay=5e-4",
        "optim.schedule=cosine", "optim.warmup_epochs=1",
        f"trainer.max_epochs={args.epochs}", "trainer.progress_bar=false",
    ]


def run_kdistill(argv: list[str], out: Path, threads: int, label: str) -> tuple[dict, float, str | None]:
    """Run one ``kdistill`` command in its own process, or reuse its finished run folder ``out``.

    Returns the run's metrics, the wall seconds (the stored training seconds when reused) and the
    commit the run used (HEAD when it starts, ``+dirty`` when src has uncommitted changes; ``None``
    when reused). Shared by the accuracy and MEAL benchmarks.
    """
    shown = shown_command(argv)
    if finished_run_matches(out, argv[1:]):
        print(f"{label}: reusing the finished run in {out}", flush=True)
        metrics = json.loads((out / "metrics.json").read_text())
        return metrics, metrics.get("train_seconds", 0.0), None
    if out.exists():  # an unfinished or different run: moved aside (out.replaced-<time>), not mixed into
        argv = [*argv, "--overwrite"]
    print(f"[{time.strftime('%H:%M:%S')}] {label}: {shown}", flush=True)
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if subprocess.run([*git, "diff", "--quiet", "HEAD", "--", "src"]).returncode:
        commit += "+dirty"
    start = time.perf_counter()
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # avoids oversubscription when the machine is shared
    proc = subprocess.run([sys.executable, "-m", "kdistill.cli", *argv], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        raise SystemExit(f"{label} failed with exit code {proc.returncode}")
    return json.loads((out / "metrics.json").read_text()), time.perf_counter() - start, commit


def row_overrides(row: str) -> list[str]:
    """The overrides of a row name: ``<method>`` or ``<method>@<mode>`` (``MODES``)."""
    method, _, mode = row.partition("@")
    if method not in ROWS or (mode and mode not in MODES):
        sys.exit(f"unknown row {row!r}; rows: {', '.join(ROWS)}, each optionally @{'|@'.join(MODES)}")
    return [*ROWS[method], *MODES.get(mode, [])]


def kernels() -> str:
    """The CPU kernels torch runs here (ATen's CPU capability: ``AVX2``, ``AVX512``, ...; ``ATEN_CPU_CAPABILITY``
    lowers it). A seeded run reproduces its numbers only with the same kernels and thread count: another
    instruction set rounds sums differently, and the difference grows over the training steps."""
    return torch.backends.cpu.get_cpu_capability()


def run_row(method: str, seed: int, args: argparse.Namespace, data_root: Path) -> dict:
    out = Path(args.runs) / f"{method}-seed{seed}"
    command = "train" if method == "ce" else "distill"
    argv = [command, *common_overrides(args, data_root), *row_overrides(method), f"data.seed={seed}", f"seed={seed}",
            f"output={out}"]
    if method == "ce":
        argv = [a for a in argv if not a.startswith("teacher.")]
    metrics, seconds, commit = run_kdistill(argv, out, args.threads, f"row {method} seed {seed}")
    return {"method": method, "seed": seed, "command": shown_command(argv),
            "wall_seconds": seconds, **({"commit": commit} if commit else {}), "kernels": kernels(),
            **{k: v for k, v in metrics.items() if k != "history"}, "history": metrics["history"]}


def add_budget_arguments(p: argparse.ArgumentParser) -> None:
    """The student budget, cache and thread options, the same in every tiny100 harness (the MEAL
    benchmark reuses this harness's CE row only when the budgets are equal)."""
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--cache", default=os.environ.get("KDISTILL_CACHE", str(Path.home() / ".cache" / "kdistill")))
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for each command (0: torch's default)")


def append_row(cache_file: Path, row: dict) -> list[dict]:
    """Add ``row`` to the JSON cache and return all rows.

    Several harness processes may run rows side by side (one per core, ``--threads 1``), so the
    file is re-read under an exclusive lock and replaced atomically: no process overwrites a row
    that another one finished meanwhile, and an interrupted write never leaves a truncated file.
    """
    with open(cache_file.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = json.loads(cache_file.read_text()) if cache_file.is_file() else []
        rows = [r for r in rows if (r["method"], r["seed"]) != (row["method"], row["seed"])] + [row]
        atomic_write_text(cache_file, json.dumps(rows, indent=1))
    return rows


def finished_run_matches(out: Path, overrides: list[str]) -> bool:
    """A run folder that finished (``metrics.json``) with exactly the configuration of this row."""
    from kdistill.config import Config, build_config

    if not (out / "metrics.json").is_file() or not (out / "config.json").is_file():
        return False
    from kdistill.methods import parse_method_options

    stored = Config.from_dict(json.loads((out / "config.json").read_text())).to_dict()  # new keys get defaults
    wanted = build_config(None, overrides).to_dict()
    # config.json holds every method option as the run used it and the data's own class count
    given = parse_method_options(wanted["method"]["name"], wanted["method"]["options"]).to_dict()
    if any(json.dumps(stored["method"]["options"].get(k)) != json.dumps(given[k], default=list)
           for k in wanted["method"]["options"]):
        return False
    for raw in (stored, wanted):
        raw["method"]["options"] = {}
        raw["data"]["num_classes"] = None
    return stored == wanted


def write_table(rows: list[dict], args: argparse.Namespace, path: Path) -> None:
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    ce = by_method.get("ce")
    ce_last = sum(r["top1_last"] for r in ce) / len(ce) if ce else None
    lines = [
        "# Accuracy benchmark: resnet56 → resnet20 on tiny100-32",
        "",
        f"- Data: `tiny100-32` (../shared/data), {args.per_class} train images per class "
        f"({100 * args.per_class} images, class-balanced, chosen by the seed), the full val split (5,000).",
        "- Teacher: `../shared/teachers/resnet56_tiny100-32.pth` (51.02% val top-1, shared CIFAR layout).",
        f"- Budget: {args.epochs} epochs, batch 64, SGD Nesterov lr 0.05, cosine with 1 warm-up epoch, wd 5e-4; "
        "every row the same. Statistic: top-1 on val at the last epoch and the best epoch.",
        f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}; "
        "OMP_NUM_THREADS of each row in the commands below. Images/s and step times were measured "
        "while other work shared the machine: compare them within this table only (benchmarks/speed.py measures speed).",
        f"- Reproduce: `python benchmarks/accuracy.py --threads {args.threads} --per-class {args.per_class} "
        f"--epochs {args.epochs}` (resumable: rows are cached in the JSON beside this file, and a finished run "
        "folder with the row's exact configuration is reused).",
        "",
        "| method | seeds | top-1 last (%) | top-1 best (%) | Δ last vs CE | train images/s | step time (ms) | peak memory (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in [m for m in DEFAULT_ORDER if m in by_method] + [m for m in by_method if m not in DEFAULT_ORDER]:
        rs = by_method[method]
        last = [r["top1_last"] for r in rs]
        best = [r["top1_best"] for r in rs]
        mean_last = sum(last) / len(last)

        def fmt(v: list[float]) -> str:
            m = sum(v) / len(v)
            if len(v) == 1:
                return f"{m:.2f}"
            sd = (sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5
            return f"{m:.2f} ± {sd:.2f}"

        ips = sum(r["train_images_per_s"] for r in rs) / len(rs)
        delta = f"{mean_last - ce_last:+.2f}" if ce_last is not None else "n/a"
        mem = max(r.get("peak_memory_mb", float("nan")) for r in rs)
        lines.append(f"| {method} | {len(rs)} | {fmt(last)} | {fmt(best)} | {delta} | {ips:.0f} | "
                     f"{1000 * 64 / ips:.0f} | {mem:.0f} |")
    lines += modes_section(by_method)
    notes = [NOTES[m] for m in DEFAULT_ORDER if m in by_method and m in NOTES]
    inflated = [m for m, rs in by_method.items() if max(r.get("peak_memory_mb", 0) for r in rs) > 2900]
    if inflated:
        notes.append(
            f"Peak memory is the run process's maximum RSS. The rows {', '.join(inflated)} ran before commit 51dad76, when "
            "loading the data computed the train split's channel statistics on a float64 copy of all 50,000 images "
            "(plus a transposed copy): a 2.4 GB transient that set their peak. Since then the statistics come from "
            "uint8 histograms (loading the split peaks at 0.67 GB) with float32-identical values, so those rows' "
            "accuracies are unaffected; their memory column overstates what the method needs."
        )
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Commands", ""]
    for r in rows:
        threads = r.get("threads") or "default"
        lines.append(f"- {r['method']} seed {r['seed']} ({r['wall_seconds'] / 60:.1f} min, OMP_NUM_THREADS={threads}): "
                     f"`{r['command']}`")
    path.write_text("\n".join(lines) + "\n")


# Shown under the modes table: how the plain rows' kernels were established (they predate the kernels field).
MODES_NOTE = (
    "**Why the plain rows and their eager reruns differ (KD 17.02 vs 16.06, ReviewKD 19.56 vs 18.16) with the same "
    "command and seed.** The plain "
    "rows ran on an earlier machine with AVX2 kernels; this one has AVX512. Run here with AVX2 kernels "
    "(`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2` before the KD row's command), "
    "the first epoch gives exactly the plain row's numbers (val top-1 1.74%, top-5 9.24%, last-step loss 4.713802); "
    "without them, exactly the rerun's (1.96%, 9.04%). The same holds for ReviewKD (first epoch with AVX2 kernels: "
    "1.56%, 7.28%, the plain row's; rerun here: 1.94%). The step losses of the two differ from the first step in the "
    "seventh digit (rounding of the vectorised sums), and 780 SGD steps amplify that to 0.96 points of final top-1. "
    "With the same kernels and thread count a seeded run reproduces: two runs of the KD command shortened to 2 epochs "
    "of 8 batches give bit-identical weights, and the code of commit 12dbb2d (which added the plain KD row) and of "
    "commit 3aeecad give identical step losses and validation numbers over the first two full epochs, the same as "
    "the rerun's (commit 39039e1). So a rounding-level change alone moves one seed's top-1 here "
    "by about a point: a difference of 0.5 points between modes is below what one seed per mode can resolve."
)


def modes_section(by_method: dict[str, list[dict]]) -> list[str]:
    """Rows run in another execution mode next to the same method's eager rows: the difference is taken
    per seed against ``<method>@eager`` rows that ran with the same kernels (``kernels()``), then averaged."""
    methods = sorted({m.partition("@")[0] for m in by_method if "@" in m})
    if not methods:
        return []
    lines = ["", "## Execution modes: compiled and/or bf16 mixed-precision steps against eager", "",
             "Same budget and command as the method's row, plus the mode's overrides (see Commands). `eager (rerun)` is "
             "the plain command rerun next to the mode rows. *Kernels* are the CPU kernels torch ran (ATen's CPU "
             "capability): a seeded run reproduces its numbers exactly with the same kernels and thread count, and only "
             "then, so each mode is compared, seed by seed, with the eager rerun of the same seed and kernels. Train "
             "images/s were measured on a shared machine: compare them within a method only.", "",
             "| method | mode | kernels | seeds | top-1 last (%) | top-1 best (%) | top-1 last per seed | "
             "Δ last vs eager (rerun), mean over the seeds both ran with the same kernels | train images/s |",
             "|---|---|---|---|---|---|---|---|---|"]

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    for method in methods:
        names = [method] * (method in by_method) + sorted(m for m in by_method if m.startswith(f"{method}@"))
        names.sort(key=lambda n: (n != method, n != f"{method}@eager", n))
        for name in names:
            rs = sorted(by_method[name], key=lambda r: r["seed"])
            ks = sorted({r.get("kernels", "not recorded") for r in rs})
            # rows that predate the kernels field pair with nothing
            eager = {(r["seed"], r["kernels"]): r["top1_last"] for r in by_method.get(f"{method}@eager", []) if "kernels" in r}
            pairs = [r["top1_last"] - eager[r["seed"], r["kernels"]] for r in rs if (r["seed"], r.get("kernels")) in eager]
            delta = ("—" if name in (method, f"{method}@eager") or not pairs else
                     f"{mean(pairs):+.2f}" + (f" (per seed {', '.join(f'{d:+.2f}' for d in pairs)})" if len(pairs) > 1 else ""))
            mode = {"": "eager (the row above)", "eager": "eager (rerun)"}.get(name.partition("@")[2], name.partition("@")[2])
            per_seed = ", ".join(f"{r['top1_last']:.2f}" for r in rs)
            lines.append(f"| {method} | {mode} | {', '.join(ks)} | {', '.join(str(r['seed']) for r in rs)} | "
                         f"{mean([r['top1_last'] for r in rs]):.2f} | {mean([r['top1_best'] for r in rs]):.2f} | "
                         f"{per_seed} | {delta} | {mean([r['train_images_per_s'] for r in rs]):.0f} |")
    if any(r.get("kernels") == "AVX2" for r in by_method.get("kd", [])) and "kd@eager" in by_method:
        lines += ["", MODES_NOTE]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(DEFAULT_ORDER))
    p.add_argument("--seeds", default="0")
    add_budget_arguments(p)
    p.add_argument("--teacher", default=str(SHARED / "teachers" / "resnet56_tiny100-32.pth"))
    p.add_argument("--runs", default=str(ROOT / "runs" / "bench-accuracy"))
    p.add_argument("--name", default="accuracy_tiny100")
    p.add_argument("--table-only", action="store_true", help="rewrite the table from the cached rows, run nothing")
    args = p.parse_args()
    if args.table_only:
        cache_file = RESULTS / f"{args.name}.json"
        write_table(json.loads(cache_file.read_text()), args, RESULTS / f"{args.name}.md")
        return
    data_root = unpack_tiny100(Path(args.cache) / "data")
    RESULTS.mkdir(parents=True, exist_ok=True)
    cache_file = RESULTS / f"{args.name}.json"
    rows = json.loads(cache_file.read_text()) if cache_file.is_file() else []
    done = {(r["method"], r["seed"]) for r in rows}
    budget = {"per_class": args.per_class, "epochs": args.epochs}
    for method in args.methods.split(","):
        row_overrides(method)  # exits on an unknown row
        for seed in [int(s) for s in args.seeds.split(",")]:
            if (method, seed) in done:
                continue
            row = {**run_row(method, seed, args, data_root), "budget": budget, "threads": args.threads}
            rows = append_row(cache_file, row)
            write_table(rows, args, RESULTS / f"{args.name}.md")
            print(f"  → top-1 last {row['top1_last']:.2f}  best {row['top1_best']:.2f}", flush=True)
    rows = json.loads(cache_file.read_text()) if cache_file.is_file() else rows  # rows other processes added
    write_table(rows, args, RESULTS / f"{args.name}.md")


if __name__ == "__main__":
    main()
