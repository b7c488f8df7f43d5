"""The teachers' own validation accuracy, measured before distilling (cached per weights file), and a warning
when a teacher is not above what the student reaches alone: distilling from it would likely cost accuracy."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdistill.config import Config
from kdistill.data import DataBundle
from kdistill.data.folders import default_cache_dir
from kdistill.files import atomic_write

log = logging.getLogger(__name__)


@dataclass
class TeacherScore:
    """One teacher's validation accuracy (%) and whether it came from the cache."""

    model: str
    top1: float
    top5: float
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "top1": self.top1, "top5": self.top5}


def file_hash(path: str | Path) -> str:
    """SHA-256 of a file's bytes (the identity of a weights file, wherever it is)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cache_key(cfg: Config, index: int, data: DataBundle) -> str | None:
    """Weights file hash + model + the validation data; ``None`` for an untrained teacher (nothing to cache)."""
    tc = cfg.teachers[index]
    weights = tc.checkpoint or tc.pretrained
    if not weights:
        return None
    d = cfg.data
    parts = [file_hash(weights), tc.model, json.dumps(tc.kwargs, sort_keys=True), d.name, str(d.root),
             str(d.image_size), str(d.val_size if d.name == "synthetic" else ""), str(d.seed), str(len(data.val)),
             json.dumps([tc.mean or data.mean, tc.std or data.std])]
    if cfg.trainer.limit_val_batches not in (None, 1.0):  # a score on the first batches only
        parts += [f"limit_val_batches={cfg.trainer.limit_val_batches}", f"eval_batch_size={d.eval_batch_size}"]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def teacher_scores(cfg: Config, data: DataBundle, teachers: list[torch.nn.Module],
                   cache_file: Path | None = None) -> list[TeacherScore]:
    """Top-1/top-5 (%) of each teacher on the validation split, read from or added to ``cache_file``
    (default ``$KDISTILL_CACHE/teacher_accuracy.json``)."""
    from kdistill.engine.run import evaluate_model, val_batch_limit

    cache_file = cache_file or default_cache_dir() / "teacher_accuracy.json"
    try:
        cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    except (OSError, ValueError):
        cache = {}  # a damaged cache is only a lost speed-up
    scores, changed = [], False
    # the same validation batches as the run's own validation (trainer.limit_val_batches), so a smoke run of
    # a large teacher does not score the whole split first
    max_batches = val_batch_limit(cfg.trainer.limit_val_batches, -(-len(data.val) // cfg.data.eval_batch_size))
    for i, (tc, teacher) in enumerate(zip(cfg.teachers, teachers, strict=True)):
        key = _cache_key(cfg, i, data)
        if key is not None and key in cache:
            scores.append(TeacherScore(tc.model, cache[key]["top1"], cache[key]["top5"], cached=True))
            continue
        was = teacher.training
        m = evaluate_model(teacher, data.val, tc.mean or data.mean, tc.std or data.std, cfg.data.eval_batch_size,
                           device=next(teacher.parameters()).device, max_batches=max_batches)
        teacher.train(was)
        scores.append(TeacherScore(tc.model, m["top1"], m["top5"]))
        if key is not None:
            cache[key] = {"top1": m["top1"], "top5": m["top5"], "model": tc.model}
            changed = True
    if changed:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cache_file, lambda tmp: Path(tmp).write_text(json.dumps(cache, indent=1)))
        except OSError as exc:
            log.warning("could not write the teacher accuracy cache %s: %s", cache_file, exc)
    return scores


def student_alone(out: Path, student_model: str) -> tuple[float, Path] | None:
    """The best top-1 (%) of a finished plain run (method ``ce``) of the same student model in the run
    folder's parent folder (``runs/student`` beside ``runs/kd``), and its folder."""
    best = None
    for metrics in sorted(out.resolve().parent.glob("*/metrics.json")):
        run = metrics.parent
        if run == out.resolve() or not (run / "config.json").is_file():
            continue
        try:
            cfg = json.loads((run / "config.json").read_text())
            top1 = float(json.loads(metrics.read_text())["top1_best"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if cfg.get("method", {}).get("name") == "ce" and cfg.get("student", {}).get("model") == student_model:
            if best is None or top1 > best[0]:
                best = (top1, run)
    return best


def weak_teacher_warnings(scores: list[TeacherScore], num_classes: int, out: Path, student_model: str) -> list[str]:
    """One warning per teacher whose top-1 is not above the student alone (a plain run beside this one)
    or is within 1.5x chance."""
    chance = 100.0 / num_classes
    alone = student_alone(out, student_model)
    warnings = []
    for i, s in enumerate(scores):
        if s.top1 <= 1.5 * chance:
            warnings.append(f"warning: teacher {i} ({s.model}) scores {s.top1:.2f}% top-1, near chance "
                            f"({chance:.2f}% for {num_classes} classes): it is untrained or does not fit this data; "
                            "distilling from it will not help the student")
        elif alone is not None and s.top1 <= alone[0]:
            warnings.append(f"warning: teacher {i} ({s.model}) scores {s.top1:.2f}% top-1, not above the student "
                            f"alone ({alone[0]:.2f}% in {alone[1]}): distilling from it is likely to cost accuracy; "
                            "train or fine-tune the teacher further first")
    return warnings
