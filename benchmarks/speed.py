"""Speed harness (docs/speed.md): training-step time of each method next to two floors measured in the same process.

For each pair (resnet56 → resnet20, resnet32x4 → resnet8x4; batch 64, 32×32, 100 classes) and method,
one child process builds the models and measures, interleaved step by step so that a changing
background load hits all of them alike:

* ``student``  the plain student training step (forward, cross-entropy, backward, SGD step);
* ``teacher``  one teacher inference pass (eval, inference mode, fp32);
* ``method``   the method's whole step (``Distiller.forward_train`` + backward + SGD step, the
  reference ``train_step`` of ``kdistill.step``, so MEAL's own optimizer runs too);
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

``--modes`` compares execution modes instead (eager, ``torch.compile``, bf16 mixed precision,
channels-last; ``speed_modes.py``) and writes ``speed-modes-cpu.md``:

    python benchmarks/speed.py --modes eager,eager+bf16,compiled,compiled+bf16 --methods kd,dkd,reviewkd,crd,meal_v2 --cache-check kd

``--online`` times the online methods' steps against their networks trained alone (``speed_online.py``)
and writes ``speed-online-cpu.md``:

    python benchmarks/speed.py --online dml,oekd,mcl,mcl_okd,ffsd
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import RESULTS, ROOT, machine_line
from speed_measure import DEFAULT_PAIRS, METHODS, PAIRS, measure_epoch, measure_method, measure_teacher
from speed_report import row_key, write_report


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
    parser.add_argument("--modes", help="compare these execution modes per method (speed_modes.py), e.g. "
                        "eager,eager+bf16,compiled,compiled+bf16,compiled+bf16+cl")
    parser.add_argument("--cache-check", default="", help="with --modes: methods whose compile is repeated in a second "
                        "process with the same Inductor cache (what a resumed run pays)")
    parser.add_argument("--online", help="time these online methods against their networks trained alone "
                        "(speed_online.py), e.g. dml,oekd,mcl,mcl_okd,ffsd")
    parser.add_argument("--compile-cache", help=argparse.SUPPRESS)
    parser.add_argument("--row", nargs=2, metavar=("PAIR", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.row:
        if args.allocator == "keep":
            from kdistill.engine.allocator import keep_freed_memory

            keep_freed_memory()  # as the engine does on CPU
        pair, method = args.row
        if method.endswith("@online"):
            from speed_online import measure_online

            result = measure_online(method.split("@")[0], args)
        elif method.endswith("@modes"):
            from speed_modes import measure_modes

            name = method.split("@")[0]
            result = measure_modes(pair, name, args)
        elif method in ("teacher", "epoch"):
            result = (measure_teacher if method == "teacher" else measure_epoch)(pair, args)
        else:
            result = measure_method(pair, method, args)
        print("ROW " + json.dumps(result))
        return
    if args.modes and args.out == str(RESULTS / "speed-cpu"):
        args.out = str(RESULTS / "speed-modes-cpu")
    if args.online and args.out == str(RESULTS / "speed-cpu"):
        args.out = str(RESULTS / "speed-online-cpu")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    store = out.with_suffix(".json")
    old = {} if args.fresh or not store.is_file() else json.loads(store.read_text())
    rows: dict[str, Any] = old.get("rows", {})
    passthrough = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--teacher-steps", str(args.teacher_steps),
                   "--agreement-images", str(args.agreement_images), "--batch", str(args.batch),
                   "--epoch-batches", str(args.epoch_batches), "--epoch-repeats", str(args.epoch_repeats),
                   "--threads", str(args.threads), "--device", args.device, "--tmp", args.tmp,
                   "--allocator", args.allocator, *(["--modes", args.modes] if args.modes else [])]
    meta = {"machine": machine_line(), "command": "python benchmarks/speed.py " + shlex.join(sys.argv[1:]),
            "batch": args.batch, "threads": args.threads, "device": args.device, "steps": args.steps, "warmup": args.warmup,
            "allocator": args.allocator}
    earlier = old.get("meta", {}).get("commands", [old["meta"]["command"]] if "meta" in old else [])
    meta["commands"] = [*earlier, meta["command"]]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT / "src")}
    report = write_report
    if args.modes:
        from speed_modes import measure_cache, write_modes_report

        report = write_modes_report
    if args.online:
        from speed_online import write_online_report

        report = write_online_report
    for pair in ["cohort"] if args.online else args.pairs.split(","):
        methods = [f"{m}@online" for m in args.online.split(",")] if args.online else args.methods.split(",")
        if args.modes:
            methods = [f"{m}@modes" for m in methods] + [f"{m}@compile-cache" for m in args.cache_check.split(",") if m]
        for method in methods:
            key = row_key(pair, method)
            if key in rows and "error" not in rows[key]:
                continue
            print(f"[speed] {key} (load {os.getloadavg()[0]:.1f})", flush=True)
            if method.endswith("@compile-cache"):
                try:
                    rows[key] = measure_cache(pair, method.split("@")[0], args, __file__, env)
                except RuntimeError as err:
                    rows[key] = {"pair": pair, "method": method, "error": str(err)}
                store.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
                report(out.with_suffix(".md"), rows, meta)
                continue
            proc = subprocess.run([sys.executable, __file__, "--row", pair, method, *passthrough],
                                  capture_output=True, text=True, env=env)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")), None)
            rows[key] = json.loads(line[4:]) if line else {"pair": pair, "method": method, "error": proc.stderr.strip()[-800:]}
            store.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
            report(out.with_suffix(".md"), rows, meta)
    report(out.with_suffix(".md"), rows, meta)
    print(out.with_suffix(".md").read_text())


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
