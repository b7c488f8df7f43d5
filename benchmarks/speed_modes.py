"""Step time per execution mode: eager vs ``torch.compile`` vs bf16 mixed precision (``speed.py --modes``).

For one pair and method, one child process builds the same distiller (same seed) once per mode and
times the whole training step of each, interleaved step by step so that a changing background load
hits every mode alike. The step is what the engine runs: the forward (teacher passes, student pass
with its taps, the method's own step if any, the method's losses) under the mode's autocast, then
the backward and the optimizer steps outside it.

Modes (``+``-joined): ``eager`` | ``compiled`` (``kdistill.engine.compile.compile_distiller``,
Inductor) and optionally ``bf16`` (autocast to bfloat16 around the forward as ``trainer.precision=
bf16-mixed`` does, teachers in bf16, float32 classifiers and losses) and ``cl`` (channels-last
weights and input for student, teachers and the method's modules). The first steps of a compiled
mode include compilation: reported apart as *compile s* (wall time of the first step minus a
measured step) with a fresh Inductor cache per row (a cold compile). The loss of each mode's first
step (same weights, same batch) is compared with eager float32.

The ``compile-cache`` row compiles the same step in two processes one after the other with one
Inductor cache directory: the second process shows what a resumed run pays.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_MODES = "eager,eager+bf16,compiled,compiled+bf16,compiled+bf16+cl"


def native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX); CUDA devices are not checked here."""
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    return "avx512_bf16" in flags or "amx_bf16" in flags


def make_step(d: Any, opt: Any, own: Any, bf16: bool, device: str) -> Callable[[Any, Any], dict[str, Any]]:
    """The engine's step: forward under the mode's autocast, backward and optimizer steps outside it."""
    import torch

    from kdistill.step import sum_losses

    def step(batch: Any, info: Any) -> dict[str, Any]:
        own.sync_lr(opt)
        opt.zero_grad(set_to_none=True)
        own.zero_grad()
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            _, losses = d.forward_train(batch, info, own_step=own.separate_step)
        sum_losses(losses).backward()
        own.after_main_backward()
        opt.step()
        return losses

    return step


def build_mode(pair: str, method: str, mode: str, device: str) -> Any:
    """The distiller of one row in one mode (``build`` of ``speed_measure``, the same seed in every mode)."""
    import torch
    from speed_measure import build

    from kdistill.engine.compile import compile_distiller
    from kdistill.engine.precision import float32_classifier

    parts = set(mode.split("+"))
    unknown = parts - {"eager", "compiled", "bf16", "cl"}
    if unknown or len(parts & {"eager", "compiled"}) != 1:
        raise SystemExit(f"unknown mode {mode!r}: use eager|compiled, optionally +bf16 and +cl")
    d = build(pair, method, device)
    if "bf16" in parts:
        d.configure_teachers("bf16", "cl" in parts)
        float32_classifier(d.student)
    elif "cl" in parts:
        d.configure_teachers("32", True)
    if "cl" in parts:
        d.student.to(memory_format=torch.channels_last)
        d.method.to(memory_format=torch.channels_last)
    if "compiled" in parts:
        compile_distiller(d)
    return d


def measure_modes(pair: str, method: str, args: Any) -> dict[str, Any]:
    """One row: every mode of ``args.modes`` built, compiled, then timed interleaved."""
    import resource

    import torch
    from speed_measure import NUM_CLASSES

    from kdistill.engine.compile import compile_stats, use_compile_cache
    from kdistill.methods.base import Batch, StepInfo
    from kdistill.step import OwnOptimizerStep

    Path(args.tmp).mkdir(parents=True, exist_ok=True)
    cache = use_compile_cache(args.compile_cache or tempfile.mkdtemp(prefix="inductor-", dir=args.tmp))
    device = args.device
    modes = [m for m in args.modes.split(",") if "bf16" not in m or native_bf16() or device.startswith("cuda")]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g).to(device)
    targets = torch.randint(0, NUM_CLASSES, (args.batch,), generator=g).to(device)
    index = torch.randint(0, 50_000, (args.batch,), generator=g).to(device)
    load0 = os.getloadavg()
    runs: dict[str, dict[str, Any]] = {}
    for mode in modes:
        d = build_mode(pair, method, mode, device)
        opt = torch.optim.SGD(d.trainable_parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        own = OwnOptimizerStep(d.method)
        step = make_step(d, opt, own, "bf16" in mode, device)
        xb = x.contiguous(memory_format=torch.channels_last) if "cl" in mode else x
        batch = Batch(xb, targets, index)
        first: list[dict[str, float]] = []
        losses = None
        for i in range(max(1, args.warmup)):
            torch.manual_seed(1)  # CRD's negatives: the same draw in every mode's first step
            c0, w0 = time.thread_time(), time.perf_counter()
            out = step(batch, StepInfo(epoch=0, step=i, max_epochs=240))
            first.append({"wall_s": time.perf_counter() - w0, "cpu_s": time.thread_time() - c0})
            if losses is None:
                losses = {k: float(v.detach()) for k, v in out.items()}
        runs[mode] = {"distiller": d, "step": step, "batch": batch, "first": first, "losses": losses,
                      "cpu": [], "wall": []}
    for i in range(args.steps):
        for r in runs.values():
            c0, w0 = time.thread_time(), time.perf_counter()
            r["step"](r["batch"], StepInfo(epoch=0, step=args.warmup + i, max_epochs=240))
            r["cpu"].append(time.thread_time() - c0)
            r["wall"].append(time.perf_counter() - w0)
    eager_total = sum(runs.get("eager", runs[modes[0]])["losses"].values())
    result: dict[str, Any] = {"pair": pair, "method": f"{method}@modes", "batch": args.batch, "steps": args.steps,
                              "load": [load0, os.getloadavg()], "native_bf16": native_bf16(), "modes": {},
                              "compile": compile_stats(), "cache_dir": str(cache),
                              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    for mode, r in runs.items():
        cpu_ms, wall_ms = 1000 * statistics.median(r["cpu"]), 1000 * statistics.median(r["wall"])
        total = sum(r["losses"].values())
        result["modes"][mode] = {
            "cpu_ms": cpu_ms, "wall_ms": wall_ms, "first_steps": r["first"],
            "compile_s": r["first"][0]["wall_s"] - wall_ms / 1000 if "compiled" in mode else 0.0,
            "losses": r["losses"], "loss_rel_diff": abs(total - eager_total) / max(abs(eager_total), 1e-12),
        }
    return result


def measure_cache(pair: str, method: str, args: Any, script: str, env: dict[str, str]) -> dict[str, Any]:
    """Compile the same step in two fresh processes sharing one Inductor cache: cold, then warm."""
    import json

    Path(args.tmp).mkdir(parents=True, exist_ok=True)
    cache = tempfile.mkdtemp(prefix="inductor-cache-", dir=args.tmp)
    load0 = os.getloadavg()
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, script, "--row", pair, method + "@modes", "--modes", "compiled",
                               "--steps", "2", "--warmup", "1", "--compile-cache", cache, "--tmp", args.tmp,
                               "--device", args.device, "--batch", str(args.batch), "--threads", str(args.threads)],
                              capture_output=True, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")), None)
        if line is None:
            raise RuntimeError(proc.stderr[-800:])
        row = json.loads(line[4:])
        runs.append({**row["modes"]["compiled"], "stats": row["compile"]})
    return {"pair": pair, "method": f"{method}@compile-cache", "load": [load0, os.getloadavg()],
            "cold": runs[0], "warm": runs[1], "cache_dir_bytes": _du(Path(cache))}


def _ms(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_modes_report(path: Path, rows: dict[str, Any], meta: dict[str, Any]) -> None:
    """The modes table: step time per mode, speed-up over eager, compile time, loss agreement."""
    mode_rows = [r for r in rows.values() if r.get("method", "").endswith("@modes") and "error" not in r]
    cache_rows = [r for r in rows.values() if r.get("method", "").endswith("@compile-cache") and "error" not in r]
    lines = [
        "# Speed: eager vs compiled vs bf16 mixed precision, per method",
        "",
        f"Machine: {meta['machine']}",
        "Commands (in order; rows are cached and resumed):",
        *[f"    {c}" for c in meta.get("commands", [meta["command"]])],
        "",
        f"Settings: batch {meta['batch']}, 32×32, 100 classes, {meta['threads']} intra-op thread(s), device {meta['device']}; "
        "each mode's whole training step (forward under the mode's autocast, backward, SGD step), the modes of a row "
        "interleaved step by step after the warm-up (compilation) steps; medians of n steps. *CPU ms* is the measuring "
        "thread's CPU time (read it under load), *wall ms* beside it. *Compile s*: wall time of the first step minus a "
        "measured step, with an empty Inductor cache (cold; Inductor compiles C++ in worker processes, so only wall time "
        "shows it). *Loss Δ*: relative difference of the first step's total loss from eager float32 (same weights and batch).",
        "",
        "**Load:** the 1-minute load average at the start and end of each row (2 cores; above 2 the jobs share cores).",
        "",
        "| pair | method | mode | step CPU ms | step wall ms | **speed-up** (CPU) | speed-up (wall) | compile s | loss Δ | n | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(mode_rows, key=lambda r: (r["pair"], r["method"])):
        modes = r["modes"]
        base = modes.get("eager")
        for mode, m in modes.items():
            up = f"**{base['cpu_ms'] / m['cpu_ms']:.2f}×**" if base else "—"
            up_wall = f"{base['wall_ms'] / m['wall_ms']:.2f}×" if base else "—"
            comp = f"{m['compile_s']:.0f}" if "compiled" in mode else "—"
            lines.append(f"| {r['pair']} | {r['method'].split('@')[0]} | {mode} | {_ms(m['cpu_ms'])} | {_ms(m['wall_ms'])} | "
                         f"{up} | {up_wall} | {comp} | {m['loss_rel_diff']:.1e} | {r['steps']} | "
                         f"{r['load'][0][0]:.1f}→{r['load'][1][0]:.1f} |")
    if mode_rows:
        breaks = {k: v for r in mode_rows for k, v in r["compile"]["graph_breaks"].items()}
        lines += ["", "Graph breaks over all rows: " + ("none" if not breaks else
                  "; ".join(f"{k} ({v}×)" for k, v in breaks.items()))]
        if not all(r["native_bf16"] for r in mode_rows):
            lines += ["", "bf16 modes were skipped: this CPU has no native bf16 (AVX512-BF16 / AMX)."]
    if cache_rows:
        lines += ["", "## Compile cache: the same compiled step in two processes sharing one Inductor cache", "",
                  "The first process starts with an empty cache directory and fills it; the second, a fresh process "
                  "(as a resumed run is), uses it. *Compile s*: wall time of the first step minus a measured step; "
                  "*first step CPU s*: the measuring thread's CPU time in the first step (Dynamo's tracing and the "
                  "cache lookups; Inductor's C++ compiler runs in worker processes). *Hits/misses*: Inductor's "
                  "compiled graphs and AOT autograd's forward/backward pairs found in / added to the cache by that process.",
                  "",
                  "| pair | method | process | compile s (wall) | first step wall s | first step CPU s | step wall ms | "
                  "Inductor hits/misses | AOT autograd hits/misses | cache MiB | load |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in cache_rows:
            for name, label in (("cold", "1st, empty cache"), ("warm", "2nd, same cache")):
                m = r[name]
                c = m.get("stats", {}).get("cache")
                hits = (f"{c['inductor_hit']}/{c['inductor_miss']}", f"{c['autograd_hit']}/{c['autograd_miss']}") if c else ("—", "—")
                lines.append(f"| {r['pair']} | {r['method'].split('@')[0]} | {label} | {m['compile_s']:.1f} | "
                             f"{m['first_steps'][0]['wall_s']:.1f} | {m['first_steps'][0]['cpu_s']:.1f} | "
                             f"{_ms(m['wall_ms'])} | {hits[0]} | {hits[1]} | {r['cache_dir_bytes'] / 2**20:.0f} | "
                             f"{r['load'][0][0]:.1f}→{r['load'][1][0]:.1f} |")
    errors = [f"- {k}: {r['error']}" for k, r in sorted(rows.items()) if "error" in r]
    if errors:
        lines += ["", "## Rows that failed", "", *errors]
    path.write_text("\n".join(lines) + "\n")
