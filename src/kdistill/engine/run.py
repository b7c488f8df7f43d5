"""Runs: fit (train or distill), evaluate, export. Used by the CLI and usable from Python."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from kdistill.checkpoint import CheckpointError, load_weights, read_card, save_student
from kdistill.config import Config, TrainerConfig
from kdistill.data import DataBundle, ImageTensors, make_loader
from kdistill.engine.build import Built, build_run, load_data
from kdistill.engine.callbacks import AtomicCheckpointIO, History, Throughput
from kdistill.engine.datamodule import TensorDataModule
from kdistill.engine.module import DistillModule
from kdistill.files import atomic_write
from kdistill.models import create_model
from kdistill.models.cohort import Cohort
from kdistill.utils import ConfigError

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a finished run reports."""

    output: Path
    top1_last: float
    top1_best: float
    top5_last: float
    images_per_s: float
    history: list[dict[str, float]] = field(default_factory=list)
    export: Path | None = None
    seconds: float = 0.0


def peak_memory_mb() -> float:
    """Peak memory of this process in MiB: CUDA's max allocated when on a GPU, else peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def ensure_writable(folder: str | Path) -> Path:
    """Create ``folder`` and prove it is writable before any training starts."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output folder {str(path)!r} cannot be written: {exc.strerror or exc}") from exc
    return path


def card_for(cfg: Config, data: DataBundle, metrics: dict[str, Any]) -> dict[str, Any]:
    """The small description stored beside exported weights."""
    return {
        "format": "kdistill-student/1",
        "model": cfg.student.model,
        "model_kwargs": cfg.student.kwargs,
        "num_classes": data.num_classes,
        "classes": data.classes,
        "input_size": list(data.input_size),
        "mean": data.mean,
        "std": data.std,
        "method": cfg.method.name,
        "teachers": [t.model for t in cfg.teachers],
        "metrics": metrics,
        "skipped_images": data.skipped,
        "recipe": cfg.to_dict(),
    }


DDP_NAMES = ("ddp", "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false")


def make_strategy(t: TrainerConfig) -> Any:
    """``ddp`` becomes DDP without per-step buffer broadcasts: rank 0 must not overwrite the other
    ranks' teacher buffers or CRD memory banks (kept identical by their own all-gather); the
    student's BatchNorm statistics are averaged before each validation instead
    (``DistillModule.sync_batchnorm_stats``). Other strategy names pass through to Lightning."""
    if t.strategy in DDP_NAMES:
        import inspect

        from lightning.pytorch.strategies import DDPStrategy
        from torch.nn.parallel import DistributedDataParallel

        new = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        no_sync = {"forward_sync_buffers": False} if new else {"broadcast_buffers": False}
        return DDPStrategy(find_unused_parameters=t.strategy.endswith("_true"), **no_sync)
    return t.strategy


def make_trainer(cfg: Config, out: Path, callbacks: list[L.Callback], enable_checkpoints: bool = True) -> L.Trainer:
    t = cfg.trainer
    best = ModelCheckpoint(
        dirpath=out / "checkpoints", filename="best-epoch{epoch:03d}", auto_insert_metric_name=False,
        monitor="val/top1", mode="max", save_top_k=1,
    )
    # its own callback: Lightning's save_last only writes when a new best was saved, so a run whose
    # accuracy stalls would resume from a stale epoch
    last = ModelCheckpoint(dirpath=out / "checkpoints", filename="last", save_top_k=1, monitor=None,
                           every_n_epochs=1, enable_version_counter=False)
    loggers = [CSVLogger(out, name="logs", version=""), TensorBoardLogger(out, name="tb", version="")]
    extra = {k: v for k, v in (("limit_train_batches", t.limit_train_batches),
                                ("limit_val_batches", t.limit_val_batches)) if v is not None}
    return L.Trainer(
        max_epochs=t.max_epochs, accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
        strategy=make_strategy(t), precision=t.precision, log_every_n_steps=t.log_every_n_steps,
        check_val_every_n_epoch=t.check_val_every_n_epoch, gradient_clip_val=t.gradient_clip_val,
        callbacks=[*callbacks, best, last] if enable_checkpoints else callbacks, logger=loggers,
        plugins=[AtomicCheckpointIO()], use_distributed_sampler=False,
        enable_progress_bar=t.progress_bar, enable_model_summary=False, num_sanity_val_steps=0, **extra,
    )


def fit(cfg: Config, resume: bool = False, built: Built | None = None) -> RunResult:
    """Train (method ``ce``) or distill as the recipe says; export the final student."""
    out = ensure_writable(cfg.output)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    built = built or build_run(cfg)
    if cfg.trainer.compile:
        built.distiller.student.compile()
        for teacher in built.distiller.teachers:
            teacher.compile()
    module = DistillModule(cfg, built.distiller, built.augment, built.data.num_classes, built.teacher_cache)
    dm = TensorDataModule(built.data, cfg)
    history, speed = History(), Throughput()
    trainer = make_trainer(cfg, out, [history, speed])
    world = max(1, trainer.world_size)
    module.steps_per_epoch = len(make_loader(built.data.train, cfg.data.batch_size, True, world_size=world))
    ckpt_path = None
    if resume:
        last = out / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise ConfigError(f"--resume: no checkpoint at {str(last)!r}")
        ckpt_path = str(last)
        AtomicCheckpointIO().load_checkpoint(last)  # refuse a damaged checkpoint before touching the folder
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    (out / "run.json").write_text(json.dumps(card_for(cfg, built.data, {}), indent=2, default=str))
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    seconds = time.perf_counter() - start
    if trainer.interrupted:
        raise KeyboardInterrupt
    ckpt_cb = trainer.checkpoint_callback
    best = float(ckpt_cb.best_model_score) if ckpt_cb and ckpt_cb.best_model_score is not None else float("nan")
    m = trainer.callback_metrics
    last_top1 = float(m.get("val/top1", float("nan")))
    result = RunResult(out, last_top1 * 100, best * 100, float(m.get("val/top5", float("nan"))) * 100,
                       speed.images_per_s, history.rows, seconds=seconds)
    if trainer.is_global_zero:
        metrics = {"top1_last": result.top1_last, "top1_best": result.top1_best, "top5_last": result.top5_last,
                   "epochs": trainer.current_epoch, "train_images_per_s": result.images_per_s,
                   "train_seconds": seconds, "peak_memory_mb": peak_memory_mb()}
        student = built.distiller.student
        if isinstance(student, Cohort):
            metrics["networks"] = {k[9:]: float(v) * 100 for k, v in m.items() if k.startswith("val/top1/")}
            # every network, for `kdistill eval`; the export holds only what is deployed
            save_student(student, out / "networks.safetensors", card_for(cfg, built.data, metrics))
            student, name, kwargs = student.deployed()
            card = card_for(cfg, built.data, metrics)
            if name is not None:
                card.update(model=name, model_kwargs=kwargs)
            result.export = save_student(student, out / "student.safetensors", card)
        else:
            result.export = save_student(student, out / "student.safetensors", card_for(cfg, built.data, metrics))
        (out / "metrics.json").write_text(json.dumps({**metrics, "history": history.rows}, indent=2))
    return result


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, val: ImageTensors, mean: list[float], std: list[float],
                   batch_size: int = 256, device: str | torch.device = "cpu") -> dict[str, float]:
    """Top-1/top-5 (%) on ``val`` and inference images/s (batch ``batch_size``)."""
    from kdistill.data import BatchAugment

    aug = BatchAugment(mean, std, padding=0, flip=False).to(device)
    model = model.to(device).eval()
    correct1 = correct5 = 0
    elapsed = 0.0
    for start in range(0, len(val), batch_size):
        images, targets, _ = val[range(start, min(start + batch_size, len(val)))]
        x = aug(images.to(device), train=False)
        t0 = time.perf_counter()
        logits = model(x)
        elapsed += time.perf_counter() - t0
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()
        correct1 += (top[:, 0] == targets).sum().item()
        correct5 += (top == targets.view(-1, 1)).any(1).sum().item()
    n = len(val)
    return {"top1": 100 * correct1 / n, "top5": 100 * correct5 / n, "images_per_s": n / max(elapsed, 1e-9)}


def load_exported(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A student export (``.safetensors`` + card) as a ready model and its card."""
    card = read_card(path)
    model = create_model(card["model"], num_classes=card["num_classes"], **card.get("model_kwargs", {}))
    load_weights(model, path)
    return model, card


def load_from_run(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The student of a run folder, an export, or a training checkpoint (``.ckpt``) of a run."""
    path = Path(path)
    if path.is_dir():  # a run of several networks (online methods) keeps them all beside the export
        path = path / "networks.safetensors" if (path / "networks.safetensors").is_file() else path / "student.safetensors"
    if path.suffix == ".safetensors":
        return load_exported(path)
    if path.suffix == ".ckpt":
        run = path.parent.parent
        card_path = run / "run.json"
        if not card_path.is_file():
            raise CheckpointError(f"cannot find the run's card {str(card_path)!r} next to {str(path)!r}")
        card = json.loads(card_path.read_text())
        model = create_model(card["model"], num_classes=card["num_classes"], **card.get("model_kwargs", {}))
        load_weights(model, path, prefix="distiller.student.")
        return model, card
    raise CheckpointError(f"{str(path)!r}: expected a run folder, a .safetensors export or a .ckpt checkpoint")


def evaluate(path: str | Path, cfg: Config | None = None) -> dict[str, float]:
    """Evaluate a run / export / checkpoint on the validation split of its recipe's data."""
    model, card = load_from_run(path)
    if cfg is None:
        cfg = Config.from_dict(card["recipe"])
    data = load_data(cfg)
    if data.num_classes != card["num_classes"]:
        raise ConfigError(f"the model has {card['num_classes']} classes but the data set has {data.num_classes}")
    metrics = evaluate_model(model, data.val, card["mean"], card["std"], cfg.data.eval_batch_size)
    if isinstance(model, Cohort):  # several networks: each one, and their ensemble
        for i, name in enumerate(model.names):
            member = evaluate_model(model.member(i), data.val, card["mean"], card["std"], cfg.data.eval_batch_size)
            metrics[f"top1/{name}"] = member["top1"]
        ensemble = _Ensemble(model)
        metrics["top1/ensemble"] = evaluate_model(ensemble, data.val, card["mean"], card["std"],
                                                  cfg.data.eval_batch_size)["top1"]
    return metrics


class _Ensemble(torch.nn.Module):
    """A cohort's ensemble (mean logits of every network), whatever the cohort deploys."""

    def __init__(self, cohort: Cohort):
        super().__init__()
        self.cohort = cohort

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Cohort.ensemble(self.cohort.forward_all(x))


def export(path: str | Path, out: str | Path, onnx: bool = False) -> list[Path]:
    """Write the student as safetensors (+ card) and optionally ONNX; returns the written files."""
    model, card = load_from_run(path)
    if isinstance(model, Cohort):  # several networks: what the run deploys
        model, name, kwargs = model.deployed()
        if name is not None:
            card = {**card, "model": name, "model_kwargs": kwargs}
    out = Path(out)
    written = [save_student(model, out, card), out.with_suffix(".json")]
    if onnx:
        onnx_path = out.with_suffix(".onnx")
        dummy = torch.zeros(1, *card["input_size"])
        model.eval()
        atomic_write(onnx_path, lambda tmp: torch.onnx.export(
            model, (dummy,), str(tmp), input_names=["images"], output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False))
        written.append(onnx_path)
    return written
