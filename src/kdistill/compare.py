"""Finished runs side by side: a table (teacher, method, top-1/top-5, parameters, images/s, time) and
PNG curves of validation accuracy and training loss per epoch."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdistill.utils import ConfigError

COLUMNS = ("run", "student", "teacher", "method", "top-1 %", "best %", "top-5 %", "params", "img/s", "time s")


def run_summary(folder: str | Path) -> dict[str, Any]:
    """The numbers of one finished run folder (``config.json``, ``metrics.json``, ``student.safetensors``)."""
    from kdistill.engine.run import load_exported

    folder = Path(folder)
    try:
        cfg = json.loads((folder / "config.json").read_text())
        metrics = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{str(folder)!r} is not a finished run folder (config.json and metrics.json): {exc}") from exc
    model, _ = load_exported(folder / "student.safetensors")
    return {
        "run": str(folder), "student": cfg["student"]["model"],
        "teacher": "+".join(t["model"] for t in cfg.get("teachers", [])) or "-", "method": cfg["method"]["name"],
        "top1": metrics["top1_last"], "top1_best": metrics["top1_best"], "top5": metrics["top5_last"],
        "params": sum(p.numel() for p in model.parameters()), "images_per_s": metrics.get("train_images_per_s", 0.0),
        "seconds": metrics.get("train_seconds", 0.0), "history": metrics.get("history", []),
    }


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain text table, one run per line."""
    cells = [[r["run"], r["student"], r["teacher"], r["method"], f"{r['top1']:.2f}", f"{r['top1_best']:.2f}",
              f"{r['top5']:.2f}", f"{r['params']:,}", f"{r['images_per_s']:.0f}", f"{r['seconds']:.0f}"] for r in rows]
    widths = [max(len(c[i]) for c in [list(COLUMNS), *cells]) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in [list(COLUMNS), *cells]]
    return "\n".join(lines)


def plot_runs(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Validation top-1 and training loss per epoch, one line per run (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, loss) = plt.subplots(1, 2, figsize=(10, 4))
    for r in rows:
        epochs = [h["epoch"] for h in r["history"]]
        label = f"{Path(r['run']).name} ({r['method']})"
        acc.plot(epochs, [h["val_top1"] for h in r["history"]], marker="o", label=label)
        loss.plot(epochs, [h["train_loss"] for h in r["history"]], marker="o", label=label)
    for ax, name in ((acc, "validation top-1 (%)"), (loss, "training loss")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
