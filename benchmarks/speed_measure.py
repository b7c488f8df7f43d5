"""What the speed harness measures: the models of each pair, each method's step and its floors
(student step, teacher pass, the method's own modules), the teacher-pass variants and whole epochs.
Each ``measure_*`` runs in a child process and returns one row."""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import SHARED, unpack_tiny100
from speed_timing import Timer, paired_excess

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
    # the classic baselines and MEAL v1: informative rows, no speed target applies to them
    "crd": {"num_samples": 50_000},  # CIFAR-100's train split: the memory banks' real size
    "fitnet": {},
    "at": {},
    "sp": {},
    "pkt": {},
    "rkd": {},
    "nst": {},
    "vid": {},
    "meal_v1": {},
    "hkd": {"num_samples": 50_000},
}

NUM_CLASSES = 100



def build(pair: str, method: str, device: str):
    """Student, teacher, distiller, optimizer and a fixed batch for one row."""
    import torch

    import kdistill
    from kdistill.methods import build_method
    from kdistill.step import Distiller

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
    from kdistill.engine.teacher_cache import CachedTeachers, build_teacher_cache
    from kdistill.methods.base import Batch, ModelOutput, StepInfo
    from kdistill.step import OwnOptimizerStep, train_step

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
        source = CachedTeachers(cache, augment)

        def uncached() -> None:
            batch = Batch(augment(images_u8, train=True), targets, index)
            train_step(d, batch, info, opt, own)

        def cached() -> None:
            opt.zero_grad(set_to_none=True)
            _, losses = d.forward_train(Batch(images_u8, targets, index), info, teachers=source)
            torch.stack(list(losses.values())).sum().backward()
            opt.step()

        fns.update({"method": uncached, "cached": cached})
    else:
        batch = Batch(x, targets, index)
        t_out = d.teacher_outputs(x, [0])
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



def tiny100_train_stats() -> tuple[list[float], list[float]]:
    """Channel mean and std of the tiny100-32 train split (decoded once into the kdistill cache)."""
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
              f"model={student}", f"teacher.model={teacher}", "teacher.allow_untrained=true", "teacher.evaluate=false",
              "method.name=kd", "trainer.max_epochs=1",
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

