"""``kdistill demo``: a teacher, a plain student and a KD student, end to end, in minutes on a CPU.

With no arguments it uses the built-in synthetic data set (nothing to download); with
``--data <folder>`` the same runs on real images (``train/`` and ``val/`` or ``test/``).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L

from kdistill.config import build_config
from kdistill.engine.build import build_run, load_data
from kdistill.engine.run import RunResult, evaluate_model, fit

DEMO = {
    "synthetic": {"data.name": "synthetic", "data.num_classes": 20, "data.train_size": 3000,
                  "data.val_size": 1000, "data.image_size": 16},
    "teacher": {"model": "cifar.resnet14", "epochs": 20},
    "student": {"model": "cifar.resnet8", "epochs": 8},
    "optim": {"optim.lr": 0.1, "optim.schedule": "cosine", "optim.warmup_epochs": 1, "optim.nesterov": True},
    # one intra-op thread: these 16-px networks are too small to split across cores, and on a shared 2-core
    # machine (load 4-5) two threads trained the teacher at 15-300 images/s against 1,300 with one
    "trainer": {"trainer.threads": 1},
}


def _overrides(d: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in d.items()]


def run_demo(data_root: str | None = None, output: str = "runs/demo", quick: bool = False) -> dict[str, dict]:
    """Train teacher, student alone and KD student; print a table and write ``curves.png``."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # logs and pipes: wide enough for the table's columns
        console = Console(width=120)
    scale = 0.15 if quick else 1.0
    epochs_t = max(1, round(DEMO["teacher"]["epochs"] * scale))
    epochs_s = max(1, round(DEMO["student"]["epochs"] * scale))
    if data_root:
        data_over = {"data.name": "imagefolder", "data.root": data_root}
    else:
        data_over = dict(DEMO["synthetic"])
        if quick:
            data_over.update({"data.train_size": 384, "data.val_size": 128})
    common = _overrides({**data_over, **DEMO["optim"], **DEMO["trainer"], "trainer.progress_bar": False})
    out = Path(output)
    base_cfg = build_config(None, common)
    console.print(f"[bold]kdistill demo[/bold]: loading data ({base_cfg.data.name}) ...")
    data = load_data(base_cfg)
    console.print(f"  {len(data.train)} train / {len(data.val)} val images, {data.num_classes} classes, "
                  f"{'x'.join(map(str, data.input_size))}")

    def run(name: str, extra: dict) -> tuple[RunResult, object]:
        cfg = build_config(None, common + _overrides({**extra, "output": str(out / name)}))
        L.seed_everything(cfg.seed, verbose=False)  # same initial weights on every demo run
        built = build_run(cfg, data)
        console.print(f"[bold]{name}[/bold]: {cfg.student.model}, method {cfg.method.name}, "
                      f"{cfg.trainer.max_epochs} epochs ...")
        # a demo run replaces the previous demo's run of the same name (moved aside, not deleted)
        return fit(cfg, built=built, overwrite=True), built.distiller.student

    teacher_res, teacher = run("teacher", {"model": DEMO["teacher"]["model"], "trainer.max_epochs": epochs_t})
    student_res, student = run("student", {"model": DEMO["student"]["model"], "trainer.max_epochs": epochs_s})
    kd_res, kd_student = run("kd", {
        "model": DEMO["student"]["model"], "trainer.max_epochs": epochs_s, "method.name": "kd",
        # CE + KD at full weight (the CRD paper's "X+KD" weights): on an 8-epoch budget the benchmark's
        # 0.1 CE weight learns the labels too slowly
        "method.options": {"temperature": 4.0, "ce_weight": 1.0, "kd_weight": 1.0},
        "teachers": [{"model": DEMO["teacher"]["model"], "checkpoint": str(teacher_res.export)}],
    })

    table = Table(title="kdistill demo: top-1 on the validation split")
    for col in ("model", "network", "top-1 %", "top-5 %", "parameters", "inference images/s", "train images/s"):
        table.add_column(col, justify="right" if col not in ("model", "network") else "left")
    summary: dict[str, dict] = {}
    rows = [("teacher", DEMO["teacher"]["model"], teacher, teacher_res),
            ("student alone", DEMO["student"]["model"], student, student_res),
            ("KD student", DEMO["student"]["model"], kd_student, kd_res)]
    for label, name, model, res in rows:
        m = evaluate_model(model, data.val, data.mean, data.std)
        params = sum(p.numel() for p in model.parameters())
        summary[label] = {"network": name, **m, "parameters": params, "train_images_per_s": res.images_per_s}
        table.add_row(label, name, f"{m['top1']:.2f}", f"{m['top5']:.2f}", f"{params:,}",
                      f"{m['images_per_s']:.0f}", f"{res.images_per_s:.0f}")
    console.print(table)
    gain = summary["KD student"]["top1"] - summary["student alone"]["top1"]
    console.print(f"KD gain over the student alone: {gain:+.2f} points top-1")
    png = plot_curves({label: res.history for label, _, _, res in rows}, out / "curves.png")
    console.print(f"training curves: {png}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def plot_curves(histories: dict[str, list[dict]], path: Path) -> Path:
    """Validation top-1 per epoch of each run, one line each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rows in histories.items():
        ax.plot([r["epoch"] for r in rows], [r["val_top1"] for r in rows], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
