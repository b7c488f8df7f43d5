"""Speed harness (issue 6): training-step time of each method next to two floors measured in the same process.

For each pair (resnet56 → resnet20, resnet32x4 → resnet8x4; batch 64, 32×32, 100 classes) and method,
one child process builds the models and measures, interleaved step by step so that a changing
background load hits all of them alike:

* ``student``  the plain student training step (forward, cross-entropy, backward, SGD step);
* ``teacher``  one teacher inference pass (eval, inference mode, fp32);
* ``method``   the method's whole step (``Distiller.forward_train`` + backward + SGD step, the
  reference ``train_step`` of ``kdistill.methods.adversarial``, so MEAL's own optimizer runs too);
* ``modules``  the method's own forward+backward on fixed student/teacher outputs (ReviewKD's ABFs +
  HCL, MEAL's discriminators + losses, KD/DKD's loss alone), so ``method − floor − modules`` is
  the framework's share.

Overhead ratio = method / (student + teacher). Times are medians of per-step *CPU time of the
measuring thread* (``time.thread_time``; one intra-op thread), which a busy machine disturbs much
less than wall time; the wall-time medians are reported beside them. ``kd+cache`` is the KD step
with the teacher-output cache (``TeacherCache.training_batch`` on uint8 batches, augmentation
included, vs the same loop with the teacher pass); its ratio to ``kd`` is the epoch speed-up.
``teacher`` rows compare the teacher pass in fp32, channels_last and bf16 autocast, with the top-1
agreement of bf16 with fp32 on real validation images when the shared trained teacher is present.

Each row is cached in ``<out>.json`` (resumable); ``<out>.md`` is rewritten after every row.

    python benchmarks/speed.py                                  # everything (about an hour on a quiet 2-core CPU)
    python benchmarks/speed.py --pairs resnet56-resnet20 --methods kd,dkd --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "benchmarks" / "results"
PAIRS = {"resnet56-resnet20": ("cifar.resnet56", "cifar.resnet20"), "resnet32x4-resnet8x4": ("cifar.resnet32x4", "cifar.resnet8x4"),
         # not in the default run: a few-millisecond floor, so that a framework excess of a millisecond,
         # invisible next to a 1.3 s resnet step, is resolved (logit methods only; no stage taps)
         "tiny": ("bench.tiny_teacher", "bench.tiny_student")}
DEFAULT_PAIRS = ["resnet56-resnet20", "resnet32x4-resnet8x4"]


def register_tiny_models() -> None:
    """Two small conv nets for the ``tiny`` pair (registered on first use)."""
    from torch import nn

    from kdistill.models import register_model
    from kdistill.models.registry import is_known_model

    def tiny(width: int) -> nn.Module:
        def make(num_classes: int = 100, **_: object) -> nn.Module:
            return nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
        return make

    for name, width in (("bench.tiny_teacher", 16), ("bench.tiny_student", 8)):
        if not is_known_model(name):
            register_model(name)(tiny(width))
METHODS = {
    "kd": {},
    "dkd": {"beta": 2.0, "warmup_epochs": 0},
    "reviewkd": {"loss_weight": 1.0, "warmup_epochs": 0},
    "meal_v2": {},
    "kd+cache": {},
    # the baselines (issue 5) and MEAL v1: informative rows, no target of issue 6 applies to them
    "crd": {"num_samples": 50_000},  # CIFAR-100's train split: the memory banks' real size
    "fitnet": {},
    "at": {},
    "sp": {},
    "pkt": {},
    "rkd": {},
    "nst": {},
    "vid": {},
    "meal_v1": {},
}
NUM_CLASSES = 100


def machine_line() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    return (f"{cpu}, {os.cpu_count()} cores, native bf16: {'yes' if bf16 else 'no'}; torch {torch.__version__}, "
            f"python {platform.python_version()}; CUDA: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")


# --- measuring ---------------------------------------------------------------------------------------

class Timer:
    """Per-step thread CPU time, wall time and minor page faults of named callables, run interleaved."""

    def __init__(self, fns: dict[str, Callable[[], Any]], sync: Callable[[], None]):
        self.fns, self.sync = fns, sync
        self.cpu: dict[str, list[float]] = {k: [] for k in fns}
        self.wall: dict[str, list[float]] = {k: [] for k in fns}
        self.faults: dict[str, list[int]] = {k: [] for k in fns}

    def run(self, warmup: int, steps: int) -> None:
        for _ in range(warmup):
            for fn in self.fns.values():
                fn()
        self.sync()
        for _ in range(steps):
            for name, fn in self.fns.items():
                f0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
                c0, w0 = time.thread_time(), time.perf_counter()
                fn()
                self.sync()
                self.cpu[name].append(time.thread_time() - c0)
                self.wall[name].append(time.perf_counter() - w0)
                self.faults[name].append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - f0)

    def summary(self) -> dict[str, dict[str, float]]:
        return {k: {"cpu_ms": 1000 * statistics.median(self.cpu[k]), "wall_ms": 1000 * statistics.median(self.wall[k]),
                    "faults": statistics.median(self.faults[k])} for k in self.fns}


def build(pair: str, method: str, device: str):
    """Student, teacher, distiller, optimizer and a fixed batch for one row."""
    import torch

    import kdistill
    from kdistill.distiller import Distiller
    from kdistill.methods import build_method

    teacher_name, student_name = PAIRS[pair]
    if pair == "tiny":
        register_tiny_models()
    torch.manual_seed(0)
    student = kdistill.create_model(student_name, num_classes=NUM_CLASSES)
    teacher = kdistill.create_model(teacher_name, num_classes=NUM_CLASSES)
    name = method.split("+")[0]
    m = build_method(name, student=student, teachers=[teacher], **METHODS[method])
    distiller = Distiller(student, [teacher], m).to(device).train()
    return distiller


def measure_method(pair: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from kdistill.data import BatchAugment, ImageTensors
    from kdistill.engine.teacher_cache import build_teacher_cache
    from kdistill.methods.adversarial import OwnOptimizerStep, train_step
    from kdistill.methods.base import Batch, ModelOutput, StepInfo

    device = args.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    d = build(pair, method, device)
    student, teacher, method_mod = d.student, d.teachers[0], d.method
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    own = OwnOptimizerStep(method_mod)
    g = torch.Generator().manual_seed(0)
    n = args.batch
    raw = ImageTensors(torch.randint(0, 256, (4 * n, 3, 32, 32), dtype=torch.uint8, generator=g),
                       torch.randint(0, NUM_CLASSES, (4 * n,), generator=g))
    augment = BatchAugment([0.5] * 3, [0.25] * 3).to(device)
    images_u8, targets, index = raw[list(range(n))]
    images_u8, targets = images_u8.to(device), targets.to(device)
    x = augment(images_u8, train=True)
    info = StepInfo(epoch=0, step=0, max_epochs=240)

    def student_step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(student(x), targets).backward()
        opt.step()

    def teacher_pass() -> None:
        with torch.inference_mode():
            teacher(x)

    fns: dict[str, Callable[[], Any]] = {"student": student_step, "teacher": teacher_pass}
    if method == "kd+cache":
        cache = build_teacher_cache(d, raw, augment.cpu(), Path(args.tmp) / f"cache-{pair}", views=2, batch_size=n)
        augment.to(device)

        def uncached() -> None:
            batch = Batch(augment(images_u8, train=True), targets, index)
            train_step(d, batch, info, opt, own)

        def cached() -> None:
            batch, outs = cache.training_batch(Batch(images_u8, targets, index), augment, [0])
            opt.zero_grad(set_to_none=True)
            _, losses = d.forward_train(batch, info, teacher_outputs=outs)
            torch.stack(list(losses.values())).sum().backward()
            opt.step()

        fns.update({"method": uncached, "cached": cached})
    else:
        batch = Batch(x, targets, index)
        t_out = [d._clone_out(d.teacher_forward(0, x))]
        s_live = d.student_forward(x)
        s_fixed = ModelOutput(s_live.logits.detach(), {k: v.detach() for k, v in s_live.features.items()})

        def method_step() -> None:
            train_step(d, batch, info, opt, own)

        def modules_fb() -> None:
            s = ModelOutput(s_fixed.logits.clone().requires_grad_(),
                            {k: v.clone().requires_grad_() for k, v in s_fixed.features.items()})
            losses = method_mod(batch, s, t_out, info)
            torch.stack([v.float() for v in losses.values()]).sum().backward()
            for p in method_mod.parameters():
                p.grad = None

        fns.update({"method": method_step, "modules": modules_fb})
    timer = Timer(fns, sync)
    load0 = os.getloadavg()
    timer.run(args.warmup, args.steps)
    res = timer.summary()
    step_key = "cached" if method == "kd+cache" else "method"
    excess = paired_excess(timer.cpu[step_key], timer.cpu["student"], timer.cpu["teacher"])
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"pair": pair, "method": method, "times": res, "peak_mb": peak, "rss_before_mb": rss0,
            "module_params": sum(p.numel() for p in method_mod.parameters()), "excess_paired": excess,
            "load": [load0, os.getloadavg()], "steps": args.steps, "batch": n}


def paired_excess(step: list[float], student: list[float], teacher: list[float]) -> dict[str, Any]:
    """Step − (student step + teacher pass) per interleaved iteration, in ms: the median and a
    distribution-free 95% confidence interval of the median (order statistics k and n−1−k with
    k = ⌊(n − 1.96·√n) / 2⌋). Pairing removes the slow drifts of a shared machine that the
    difference of three separate medians keeps."""
    d = sorted(1000 * (a - b - c) for a, b, c in zip(step, student, teacher, strict=True))
    n = len(d)
    k = max(0, int((n - 1.96 * n ** 0.5) / 2))
    return {"median_ms": statistics.median(d), "ci95_ms": [d[k], d[n - 1 - k]], "n": n}


def tiny100_train_stats() -> tuple[list[float], list[float]]:
    """Channel mean and std of the tiny100-32 train split (decoded once into the kdistill cache)."""
    from accuracy import unpack_tiny100

    from kdistill.data.folders import load_image_folder

    cache = Path(os.environ.get("KDISTILL_CACHE", str(Path.home() / ".cache" / "kdistill")))
    return load_image_folder(unpack_tiny100(cache / "data") / "train").tensors.channel_stats()


def tiny100_val(limit: int) -> tuple[Any, list[float], list[float]] | None:
    """Up to ``limit`` real validation images of tiny100-32 (every k-th, so all classes appear) and labels."""
    archive = SHARED / "data" / "tiny100-32.tar.gz"
    if not archive.is_file():
        return None
    import io

    import numpy as np
    import torch
    from PIL import Image

    found = []
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = member.name.split("/")
            if len(parts) == 4 and parts[1] == "val" and member.isfile():
                img = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                found.append((parts[2], parts[3], torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)))
    found.sort(key=lambda f: (f[0], f[1]))
    classes = {name: i for i, name in enumerate(sorted({f[0] for f in found}))}  # ImageFolder's label order
    images, labels = [f[2] for f in found], [classes[f[0]] for f in found]
    step = max(1, len(images) // limit)
    x = torch.stack(images[::step][:limit])
    return x, labels[::step][:limit]


def measure_teacher(pair: str, args: argparse.Namespace) -> dict[str, Any]:
    """Teacher pass: fp32, channels_last, bf16 autocast (through ``Distiller.teacher_forward``)."""
    import torch

    from kdistill.checkpoint import load_weights
    from kdistill.data import BatchAugment

    d = build(pair, "kd", args.device).eval()
    teacher = d.teachers[0]
    trained = SHARED / "teachers" / "resnet56_tiny100-32.pth"
    real = None
    if pair == "resnet56-resnet20" and trained.is_file():
        load_weights(teacher, str(trained))
        real = tiny100_val(args.agreement_images)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)

    def run(precision: str, cl: bool) -> Callable[[], Any]:
        def fn() -> Any:
            d.configure_teachers(precision, cl)
            return d.teacher_forward(0, x)
        return fn

    fns = {"fp32": run("32", False), "channels_last": run("32", True), "bf16": run("bf16", False)}
    load0 = os.getloadavg()
    timer = Timer(fns, lambda: None)
    timer.run(1, args.teacher_steps)
    out: dict[str, Any] = {"pair": pair, "method": "teacher", "times": timer.summary(), "load": [load0, os.getloadavg()]}
    d.configure_teachers("32", False)
    ref = d.teacher_forward(0, x).logits
    d.configure_teachers("32", True)
    out["channels_last_max_abs_diff"] = float((d.teacher_forward(0, x).logits - ref).abs().max())
    if real is not None:
        images, labels = real
        mean, std = tiny100_train_stats()  # what the teacher was trained with (teachers/README.md)
        aug = BatchAugment(mean, std, padding=0, flip=False)
        logits = {}
        for precision in ("32", "bf16"):
            d.configure_teachers(precision, False)
            logits[precision] = torch.cat([d.teacher_forward(0, aug(images[i:i + 64], train=False)).logits
                                           for i in range(0, len(images), 64)])
        preds = {k: v.argmax(1) for k, v in logits.items()}
        top2 = logits["32"].topk(2, 1).values
        margin = top2[:, 0] - top2[:, 1]  # fp32 top-1 minus runner-up logit: how close to a tie
        flipped = preds["32"] != preds["bf16"]
        out["agreement"] = {"images": len(images), "top1_agree": float((~flipped).float().mean()),
                            "fp32_top1": float((preds["32"] == torch.tensor(labels)).float().mean()),
                            "bf16_top1": float((preds["bf16"] == torch.tensor(labels)).float().mean()),
                            "flipped_fp32_margins": sorted(round(float(m), 4) for m in margin[flipped]),
                            "median_fp32_margin": float(margin.median()),
                            "max_abs_logit_diff": float((logits["bf16"] - logits["32"]).abs().max()),
                            "note": "shared resnet56_tiny100-32 teacher on tiny100-32 val images, train-split normalisation"}
    d.configure_teachers("32", False)
    return out


def measure_epoch(pair: str, args: argparse.Namespace) -> dict[str, Any]:
    """Whole KD epochs through the engine (``kdistill distill``'s ``fit``) without and with the teacher
    cache, alternating; synthetic 32×32 data, ``--epoch-batches`` training batches, one small val batch."""
    import torch

    from kdistill.config import build_config
    from kdistill.engine.build import build_run
    from kdistill.engine.run import fit
    from kdistill.engine.teacher_cache import build_teacher_cache

    teacher, student = PAIRS[pair]
    tmp = Path(args.tmp) / f"epoch-{pair}"
    common = ["data.name=synthetic", f"data.num_classes={NUM_CLASSES}", f"data.train_size={args.batch * args.epoch_batches}",
              f"data.val_size={args.batch}", f"data.batch_size={args.batch}", f"data.eval_batch_size={args.batch}",
              f"model={student}", f"teacher.model={teacher}", "method.name=kd", "trainer.max_epochs=1",
              "trainer.progress_bar=false", "trainer.accelerator=cpu"]
    torch.manual_seed(0)
    built = build_run(build_config(None, [*common, f"output={tmp / 'build'}"]))
    cache_dir = tmp / "cache"
    build_teacher_cache(built.distiller, built.data.train, built.augment, cache_dir, views=2, batch_size=args.batch)
    runs: dict[str, list[dict[str, float]]] = {"teacher": [], "cache": []}
    load0 = os.getloadavg()
    for _ in range(args.epoch_repeats):
        for kind in ("teacher", "cache"):
            extra = [f"teacher.cache={cache_dir}"] if kind == "cache" else []
            cfg = build_config(None, [*common, *extra, f"output={tmp / kind}"])
            torch.manual_seed(0)
            b = build_run(cfg)  # same seed: the same teacher weights as the cache's
            c0 = time.process_time()
            result = fit(cfg, built=b, overwrite=True)  # each repeat replaces the previous one's folder
            runs[kind].append({"images_per_s": result.images_per_s, "cpu_s": time.process_time() - c0, "wall_s": result.seconds})
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("images_per_s", "cpu_s", "wall_s")} for k, v in runs.items()}
    return {"pair": pair, "method": "epoch", "runs": runs, "median": med, "batches": args.epoch_batches,
            "load": [load0, os.getloadavg()]}


# --- the parent: rows, cache, report -----------------------------------------------------------------

def row_key(pair: str, method: str) -> str:
    return f"{pair}/{method}"


def fmt(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def paired(r: dict[str, Any]) -> str:
    e = r.get("excess_paired")
    return f"{e['median_ms']:+.1f} [{e['ci95_ms'][0]:+.1f}, {e['ci95_ms'][1]:+.1f}]" if e else "—"


def write_report(path: Path, rows: dict[str, Any], meta: dict[str, Any]) -> None:
    lines = [
        "# Speed: training-step time per method against the floors (issue 6)",
        "",
        f"Machine: {meta['machine']}",
        "Commands (in order; rows are cached and resumed):",
        *[f"    {c}" for c in meta.get("commands", [meta["command"]])],
        "",
        f"Settings: batch {meta['batch']}, 32×32, 100 classes, {meta['threads']} intra-op thread(s), device {meta['device']}; "
        f"measured steps per row in column n, after {meta['warmup']} warm-up steps, interleaved; medians; "
        f"CPU allocator: {meta['allocator']} (keep = glibc keeps freed memory between steps, as the engine sets).",
        "",
        "**Load:** the 1-minute load average at the start and end of each row is listed (2 cores: a load of 2 means",
        "one single-thread job on the other core besides this one; above 2, jobs share cores and wall times inflate).",
        "The *CPU ms* columns (thread CPU time) are the ones to read under load; they still include cache and",
        "memory-bandwidth contention. The paired column takes step − floor within each interleaved iteration.",
        "",
        "| pair | method | step CPU ms | student CPU ms | teacher CPU ms | **overhead ratio** (CPU) | ratio (wall) | "
        "modules fwd+bwd ms | step − floor ms | (step − floor) / modules | paired step − floor ms [95% CI] | "
        "images/s (CPU) | peak RSS MiB | faults/step | n | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(rows):
        r = rows[key]
        if r["method"] in ("teacher", "epoch") or "error" in r:
            continue
        t = r["times"]
        s, te = t["student"]["cpu_ms"], t["teacher"]["cpu_ms"]
        floor = s + te
        if r["method"] == "kd+cache":
            step = t["cached"]["cpu_ms"]
            ratio = step / floor
            wall_ratio = t["cached"]["wall_ms"] / (t["student"]["wall_ms"] + t["teacher"]["wall_ms"])
            mods, excess, rel = "—", step - floor, "—"
            faults = t["cached"]["faults"]
        else:
            step = t["method"]["cpu_ms"]
            ratio = step / floor
            wall_ratio = t["method"]["wall_ms"] / (t["student"]["wall_ms"] + t["teacher"]["wall_ms"])
            m = t["modules"]["cpu_ms"]
            mods, excess = fmt(m), step - floor
            rel = f"{excess / m:.2f}" if m > 0 else "—"
            faults = t["method"]["faults"]
        lines.append(
            f"| {r['pair']} | {r['method']} | {fmt(step)} | {fmt(s)} | {fmt(te)} | **{ratio:.3f}** | {wall_ratio:.3f} | {mods} | "
            f"{excess:+.1f} | {rel} | {paired(r)} | {r['batch'] * 1000 / step:.0f} | {r['peak_mb']:.0f} | {faults:.0f} | {r['steps']} | "
            f"{r['load'][0][0]:.1f}→{r['load'][1][0]:.1f} |"
        )
    if any(r.get("pair") == "tiny" for r in rows.values()):
        lines += ["", "The `tiny` pair (a one-conv teacher and student, a floor of a few milliseconds) is not a workload: "
                  "it shows the framework's fixed per-step cost, which the resnet pairs cannot resolve (their "
                  "step-to-step noise is tens of milliseconds). Its overhead ratio is that fixed cost over a tiny "
                  "floor; read its step − floor against the modules' own time."]
    cache_rows = [r for r in rows.values() if r["method"] == "kd+cache" and "error" not in r]
    if cache_rows:
        lines += ["", "## Teacher-output cache: KD step with and without the cache (augmentation included)", "",
                  "| pair | KD step CPU ms (teacher pass) | KD step CPU ms (cached logits) | **epoch speed-up** (CPU) | speed-up (wall) |",
                  "|---|---|---|---|---|"]
        for r in cache_rows:
            t = r["times"]
            lines.append(f"| {r['pair']} | {fmt(t['method']['cpu_ms'])} | {fmt(t['cached']['cpu_ms'])} | "
                         f"**{t['method']['cpu_ms'] / t['cached']['cpu_ms']:.2f}×** | {t['method']['wall_ms'] / t['cached']['wall_ms']:.2f}× |")
    epoch_rows = [r for r in rows.values() if r["method"] == "epoch" and "error" not in r]
    if epoch_rows:
        lines += ["", "## Whole KD epochs through the engine (`fit`), without and with `teacher.cache`", "",
                  "Synthetic 32×32 data; each epoch is the listed number of training batches plus one validation batch and "
                  "the checkpoint writes; medians of alternating runs.", "",
                  "| pair | batches | train images/s (teacher) | train images/s (cache) | **speed-up (images/s)** | "
                  "process CPU s (teacher) | process CPU s (cache) | speed-up (CPU) | load |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in epoch_rows:
            t, c = r["median"]["teacher"], r["median"]["cache"]
            lines.append(f"| {r['pair']} | {r['batches']} | {t['images_per_s']:.1f} | {c['images_per_s']:.1f} | "
                         f"**{c['images_per_s'] / t['images_per_s']:.2f}×** | {t['cpu_s']:.1f} | {c['cpu_s']:.1f} | "
                         f"{t['cpu_s'] / c['cpu_s']:.2f}× | {r['load'][0][0]:.1f}→{r['load'][1][0]:.1f} |")
    teacher_rows = [r for r in rows.values() if r["method"] == "teacher" and "error" not in r]
    if teacher_rows:
        lines += ["", "## Teacher pass: fp32, channels_last, bf16 autocast (`teacher.precision=bf16`)", "",
                  "| pair | fp32 CPU ms | channels_last CPU ms | bf16 CPU ms | channels_last max |Δlogit| | bf16 top-1 agreement with fp32 | load |",
                  "|---|---|---|---|---|---|---|"]
        for r in teacher_rows:
            t = r["times"]
            a = r.get("agreement")
            if a and "flipped_fp32_margins" in a:
                m = a["flipped_fp32_margins"]
                agree = (f"{100 * a['top1_agree']:.2f}% of {a['images']} images ({a['note']}; top-1 fp32 "
                         f"{100 * a['fp32_top1']:.1f}%, bf16 {100 * a['bf16_top1']:.1f}%; {len(m)} flipped, their fp32 "
                         f"top-1 margins {', '.join(f'{v:.3f}' for v in m[:8])}{' …' if len(m) > 8 else ''} vs median "
                         f"{a['median_fp32_margin']:.2f}; max |Δlogit| {a['max_abs_logit_diff']:.3f})")
            elif a:
                agree = f"{100 * a['top1_agree']:.2f}% of {a['images']} images ({a['note']}; fp32 top-1 {100 * a['fp32_top1']:.1f}%)"
            else:
                agree = "not measured (no trained teacher for this pair)"
            lines.append(f"| {r['pair']} | {fmt(t['fp32']['cpu_ms'])} | {fmt(t['channels_last']['cpu_ms'])} | {fmt(t['bf16']['cpu_ms'])} | "
                         f"{r['channels_last_max_abs_diff']:.2e} | {agree} | {r['load'][0][0]:.1f}→{r['load'][1][0]:.1f} |")
    errors = [f"- {k}: {r['error']}" for k, r in sorted(rows.items()) if "error" in r]
    if errors:
        lines += ["", "## Rows that failed", "", *errors]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default=",".join(DEFAULT_PAIRS), help=f"comma-separated, from {', '.join(PAIRS)}")
    parser.add_argument("--methods", default=",".join([*METHODS, "teacher"]))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--teacher-steps", type=int, default=3, help="measured passes per teacher variant (bf16 is slow without native bf16)")
    parser.add_argument("--agreement-images", type=int, default=1024)
    parser.add_argument("--epoch-batches", type=int, default=30, help="training batches per epoch in the epoch rows (fixed per-epoch costs amortise as in real epochs)")
    parser.add_argument("--epoch-repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--out", default=str(RESULTS / "speed-cpu"), help="results path without suffix (.json, .md)")
    parser.add_argument("--tmp", default="/tmp/kdistill-speed")
    parser.add_argument("--fresh", action="store_true", help="ignore cached rows")
    parser.add_argument("--allocator", choices=["keep", "default"], default="keep",
                        help="keep: glibc keeps freed memory between steps, as the engine sets on CPU (default)")
    parser.add_argument("--row", nargs=2, metavar=("PAIR", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.row:
        if args.allocator == "keep":
            from kdistill.engine.allocator import keep_freed_memory

            keep_freed_memory()  # as the engine does on CPU
        pair, method = args.row
        if method in ("teacher", "epoch"):
            result = (measure_teacher if method == "teacher" else measure_epoch)(pair, args)
        else:
            result = measure_method(pair, method, args)
        print("ROW " + json.dumps(result))
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    store = out.with_suffix(".json")
    old = {} if args.fresh or not store.is_file() else json.loads(store.read_text())
    rows: dict[str, Any] = old.get("rows", {})
    passthrough = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--teacher-steps", str(args.teacher_steps),
                   "--agreement-images", str(args.agreement_images), "--batch", str(args.batch),
                   "--epoch-batches", str(args.epoch_batches), "--epoch-repeats", str(args.epoch_repeats),
                   "--threads", str(args.threads), "--device", args.device, "--tmp", args.tmp,
                   "--allocator", args.allocator]
    meta = {"machine": machine_line(), "command": "python benchmarks/speed.py " + shlex.join(sys.argv[1:]),
            "batch": args.batch, "threads": args.threads, "device": args.device, "steps": args.steps, "warmup": args.warmup,
            "allocator": args.allocator}
    earlier = old.get("meta", {}).get("commands", [old["meta"]["command"]] if "meta" in old else [])
    meta["commands"] = [*earlier, meta["command"]]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT / "src")}
    for pair in args.pairs.split(","):
        for method in args.methods.split(","):
            key = row_key(pair, method)
            if key in rows and "error" not in rows[key]:
                continue
            print(f"[speed] {key} (load {os.getloadavg()[0]:.1f})", flush=True)
            proc = subprocess.run([sys.executable, __file__, "--row", pair, method, *passthrough],
                                  capture_output=True, text=True, env=env)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")), None)
            rows[key] = json.loads(line[4:]) if line else {"pair": pair, "method": method, "error": proc.stderr.strip()[-800:]}
            store.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
            write_report(out.with_suffix(".md"), rows, meta)
    write_report(out.with_suffix(".md"), rows, meta)
    print(out.with_suffix(".md").read_text())


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
