"""The ImageNet recipes end to end, for a few steps, on a generated ImageNet-layout folder.

For every recipe under ``recipes/imagenet/`` this writes randomly initialised weights for each network the recipe
loads (teachers, and the student when it names a checkpoint) under exactly the file names the recipe expects
(``checkpoints/torchvision/resnet34-b627a593.pth``, ``checkpoints/timm/senet154.gluon_in1k.safetensors``, ...), in a
work folder used as the current directory, then runs ``kdistill distill <recipe>`` there with only the data root and
the budget overridden (a few batches, streamed, the recipe's own transform). The folder
(``benchmarks/photo_folders.py imagenet-layout``) has 1000 class folders of photo crops.

    python benchmarks/photo_folders.py imagenet-layout --classes 1000 --per-class 2 --out /work/cache/data13/imagenet-layout
    python benchmarks/imagenet_smoke.py --data /work/cache/data13/imagenet-layout --work /work/cache/data13/imagenet-smoke

Results (one row per recipe, resumable): ``benchmarks/results/imagenet-smoke.{md,json}``. A row is kept only while
its recipe resolves to the same configuration (a fingerprint of the resolved recipe is stored with it); a changed
recipe runs again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, shown_path

BUDGET = ["data.batch_size=2", "data.eval_batch_size=4", "data.num_workers=2", "data.in_memory=false",
          "trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
          "trainer.accelerator=cpu", "trainer.devices=1", "trainer.progress_bar=false",
          # the teachers' accuracy check before training reads the whole val split whatever limit_val_batches says
          # (2,000 images through senet154 and resnet152s: half an hour on this machine, for random weights)
          "teacher.evaluate=false"]


def write_random_weights(model_name: str, path: Path, num_classes: int) -> None:
    """A randomly initialised ``model_name`` saved as ``path`` (safetensors or a torch state dict, by suffix)."""
    import torch
    from safetensors.torch import save_file

    from kdistill.models import create_model

    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in create_model(model_name, num_classes=num_classes).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        save_file(state, str(tmp))
    else:
        torch.save(state, tmp)
    os.replace(tmp, path)


def recipe_fingerprint(cfg: object) -> str:
    """A short hash of the resolved recipe (every configuration value), so a changed recipe is run again."""
    import dataclasses

    text = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def child_cpu_seconds() -> float:
    """User + system CPU seconds of every finished child process (the run and its DataLoader workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def shown(text: str) -> str:
    """``text`` with this machine's cache folder written as ``$KDISTILL_CACHE`` (when that variable is set)."""
    return shown_path(text, "KDISTILL_CACHE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="an ImageNet-layout folder (train/ and val/, 1000 classes)")
    parser.add_argument("--work", required=True, help="work folder: weights files and run outputs (current directory of the runs)")
    parser.add_argument("--recipes", nargs="*", default=None, help="recipe names (default: every recipes/imagenet one)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "imagenet-smoke"))
    args = parser.parse_args()
    from kdistill.config import build_config

    names = args.recipes or sorted(str(p.relative_to(ROOT / "recipes").with_suffix(""))
                                   for p in (ROOT / "recipes" / "imagenet").rglob("*.yaml"))
    out = Path(args.out)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"] if out.with_suffix(".json").is_file() else {}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for name in names:
        cfg = build_config(name)
        fingerprint = recipe_fingerprint(cfg)
        if name in rows and rows[name]["returncode"] == 0 and rows[name].get("recipe_fingerprint") == fingerprint:
            continue
        files = [(m.model, m.checkpoint or m.pretrained) for m in [cfg.student, *cfg.teachers]
                 if m.checkpoint or m.pretrained]
        missing_teacher_files = [t.model for t in cfg.teachers if not (t.checkpoint or t.pretrained)]
        for model, checkpoint in files:
            if not (work / checkpoint).is_file():
                write_random_weights(model, work / checkpoint, cfg.data.num_classes)
        run_out = work / "runs" / name.replace("/", "-")
        if run_out.exists():  # an earlier attempt of this benchmark in its own work folder
            shutil.rmtree(run_out)
        argv = ["distill", name, f"data.root={args.data}", *BUDGET, f"output={run_out}"]
        load = os.getloadavg()
        cpu0, start = child_cpu_seconds(), time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "kdistill.cli", *argv], cwd=work, capture_output=True, text=True,
                              env=env)
        seconds, cpu_seconds = time.perf_counter() - start, child_cpu_seconds() - cpu0
        metrics = json.loads((run_out / "metrics.json").read_text()) if (run_out / "metrics.json").is_file() else {}
        rows[name] = {"returncode": proc.returncode, "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
                      "load_avg_1_5_15": [round(x, 2) for x in load], "recipe_fingerprint": fingerprint,
                      "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "weights_files": [c for _, c in files],
                      "teachers_without_file": missing_teacher_files, "command": shown("kdistill " + shlex.join(argv)),
                      "epochs": metrics.get("epochs"), "train_images_per_s": metrics.get("train_images_per_s"),
                      "tail": [shown(line) for line in (proc.stdout + proc.stderr).strip().splitlines()[-3:]]}
        print(name, rows[name]["returncode"], f"{seconds:.0f}s", flush=True)
        out.with_suffix(".json").write_text(json.dumps({"rows": rows}, indent=1))
    lines = ["# The ImageNet recipes, a few steps each on a generated ImageNet-layout folder", "",
             "Command:", shown(f"    python benchmarks/imagenet_smoke.py {shlex.join(sys.argv[1:])}"), "",
             "Randomly initialised weights are written under the file names each recipe expects, in the work folder "
             "the runs start in; every run loads them with strict key and shape checks, streams the folder (1000 "
             "classes of photo crops at their own sizes) with the recipe's transform and trains 3 batches of 2 "
             "images, then validates on 2 batches (the teachers' accuracy check before training is off). The accuracy of random networks means nothing; the rows show "
             "that each recipe runs end to end on this machine (2 CPU cores, shared).", "",
             "Times: wall seconds of the whole `kdistill distill` process (start-up, model building, weight loading, 3 "
             "training steps, validation) and the CPU seconds of that process and its DataLoader workers "
             "(user + system); load: the 1/5/15-minute load average when the run started (2 cores, shared with "
             "other work).", "",
             "| recipe | exit | wall s | CPU s | load at start | finished | weights files the recipe names |",
             "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        load = " / ".join(str(x) for x in row.get("load_avg_1_5_15", []))
        lines.append(f"| {name} | {row['returncode']} | {row['seconds']} | {row.get('cpu_seconds', '')} | {load} | "
                     f"{row.get('finished', '')} | {', '.join(row['weights_files'])} |")
    lines += ["", "Commands (run in the work folder):", ""] + [shown(f"    {row['command']}") for row in rows.values()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
