"""Runs: fit (train or distill), evaluate, export. Used by the CLI and usable from Python."""

from __future__ import annotations

import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from kdistill.card import export_paths, read_card_file, remove_dead_temporaries
from kdistill.checkpoint import CheckpointError, load_weights, read_card, save_student
from kdistill.config import Config, TrainerConfig
from kdistill.data import DataBundle, ImageTensors, StreamingFolder, make_loader
from kdistill.engine.build import Built, build_run, load_data
from kdistill.engine.callbacks import AtomicCheckpointIO, EpochCheckpoint, History, Throughput
from kdistill.engine.compile import compile_distiller, use_compile_cache
from kdistill.engine.datamodule import TensorDataModule
from kdistill.engine.module import DistillModule
from kdistill.engine.resume import AppendingCSVLogger, RecordConfig, plan_resume
from kdistill.engine.rundir import claim, ensure_writable, is_main_process, take_ownership
from kdistill.engine.signals import RunInterrupted, StopOnSignal
from kdistill.files import atomic_write, atomic_write_json
from kdistill.models import create_model
from kdistill.models.cohort import Cohort
from kdistill.predict import preprocessing
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
        "preprocessing": preprocessing({"input_size": list(data.input_size), "mean": data.mean, "std": data.std}),
        "method": cfg.method.name,
        "teachers": [t.model for t in cfg.teachers],
        "metrics": metrics,
        "skipped_images": data.skipped,
        "data_storage": data.storage,
        "recipe": cfg.to_dict(),
    }


def resolved_config(cfg: Config, built: Built) -> dict[str, Any]:
    """The configuration as the run uses it: the method's options with every default filled in (and
    adapted to the run), the data set's own class count."""
    raw = cfg.to_dict()
    raw["method"]["options"] = dict(built.method_options)
    raw["data"]["num_classes"] = built.data.num_classes
    return raw


def start_summary(cfg: Config, built: Built) -> str:
    """What is about to run, printed before training: networks, method and its resolved options."""
    teachers = ", ".join(t.model for t in cfg.teachers) or "none"
    options = ", ".join(f"{k}={v}" for k, v in built.method_options.items()) or "none"
    lines = [f"student {cfg.student.model}, teachers: {teachers}, {built.data.num_classes} classes, "
             f"{len(built.data.train)} training images, {cfg.trainer.max_epochs} epochs",
             f"method {cfg.method.name}: {options}"]
    lines += [f"  adapted to this run: {note}" for note in built.option_notes]
    return "\n".join(lines)


def check_teachers(cfg: Config, built: Built, out: Path) -> list[dict[str, Any]]:
    """Print each teacher's validation accuracy (cached per weights file) and a warning for a weak one."""
    from kdistill.engine.teacher_check import teacher_scores, weak_teacher_warnings

    scores = teacher_scores(cfg, built.data, built.distiller.teachers)
    for i, s in enumerate(scores):
        print(f"teacher {i} {s.model}: val top-1 {s.top1:.2f}%  top-5 {s.top5:.2f}%"
              f"{'  (cached)' if s.cached else ''}", flush=True)
    for warning in weak_teacher_warnings(scores, built.data.num_classes, out, cfg.student.model):
        print(warning, file=sys.stderr, flush=True)
    return [s.to_dict() for s in scores]


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
    best = EpochCheckpoint(
        dirpath=out / "checkpoints", filename="best-epoch{epoch:03d}", auto_insert_metric_name=False,
        monitor="val/top1", mode="max", save_top_k=1,
    )
    # its own callback: Lightning's save_last only writes when a new best was saved, so a run whose
    # accuracy stalls would resume from a stale epoch
    last = ModelCheckpoint(dirpath=out / "checkpoints", filename="last", save_top_k=1, monitor=None,
                           every_n_epochs=1, enable_version_counter=False)
    if t.checkpoint_every_n_steps:  # mid-epoch: a killed run loses at most this many steps (docs/data.md)
        callbacks = [*callbacks, ModelCheckpoint(dirpath=out / "checkpoints", filename="last", save_top_k=1,
                                                 monitor=None, every_n_train_steps=t.checkpoint_every_n_steps,
                                                 enable_version_counter=False)]
    loggers = [AppendingCSVLogger(out, name="logs", version=""), TensorBoardLogger(out, name="tb", version="")]
    # a whole number above 1 is a count of batches for Lightning, a float in (0, 1] a fraction
    extra = {k: (int(v) if v > 1 else v) for k, v in (("limit_train_batches", t.limit_train_batches),
                                                      ("limit_val_batches", t.limit_val_batches)) if v is not None}
    try:
        return L.Trainer(
            max_epochs=t.max_epochs, accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
            strategy=make_strategy(t), precision=t.precision, log_every_n_steps=t.log_every_n_steps,
            check_val_every_n_epoch=t.check_val_every_n_epoch, gradient_clip_val=t.gradient_clip_val,
            callbacks=[*callbacks, best, last] if enable_checkpoints else callbacks, logger=loggers,
            plugins=[AtomicCheckpointIO()], use_distributed_sampler=False,
            enable_progress_bar=t.progress_bar, enable_model_summary=False, num_sanity_val_steps=0, **extra,
        )
    except (MisconfigurationException, ValueError, ImportError) as exc:  # a trainer.* value Lightning refuses
        raise ConfigError(f"Lightning refused the trainer settings (trainer.accelerator={t.accelerator!r}, "
                          f"trainer.devices={t.devices!r}, trainer.strategy={t.strategy!r}, trainer.precision="
                          f"{t.precision!r}): {exc}") from exc


class RunAlreadyFinished(Exception):
    """``--resume`` of a run that has trained all its epochs; nothing was changed."""


def fit(cfg: Config, resume: bool = False, built: Built | None = None, overwrite: bool = False) -> RunResult:
    """Train (method ``ce``) or distill as the recipe says; export the final student.

    The output folder is claimed first (``engine.rundir``: a new or empty folder, the run's own on
    ``resume``, the old one moved aside on ``overwrite``) and locked while the run uses it.
    ``trainer.threads`` sets PyTorch's intra-op threads for the run and restores the caller's afterwards."""
    threads = torch.get_num_threads()
    if cfg.trainer.threads:  # for this run only; the caller's setting comes back afterwards
        torch.set_num_threads(cfg.trainer.threads)
    try:
        if not is_main_process():  # other ranks of a distributed launch write through rank 0
            return _fit(cfg, resume, built, ensure_writable(cfg.output), None)
        run = claim(cfg.output, resume=resume, overwrite=overwrite)
        try:
            return _fit(cfg, resume, built, run.path, run)
        except ConfigError:
            run.discard_if_unused()
            raise
        finally:
            run.release()
    finally:
        torch.set_num_threads(threads)


def _fit(cfg: Config, resume: bool, built: Built | None, out: Path, run: Any) -> RunResult:
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    built = built or build_run(cfg)
    if cfg.trainer.compile:
        use_compile_cache()
        compile_distiller(built.distiller, cfg.trainer.compile_mode)
    module = DistillModule(cfg, built.distiller, built.augment, built.data.num_classes, built.teacher_cache)
    dm = TensorDataModule(built.data, cfg)
    speed = Throughput()
    history = History(speed)
    stop = StopOnSignal(out / "checkpoints" / "last.ckpt")
    trainer = make_trainer(cfg, out, [history, speed, stop, RecordConfig(cfg.to_dict())])
    world = max(1, trainer.world_size)
    module.steps_per_epoch = len(make_loader(built.data.train, cfg.data.batch_size, True, world_size=world,
                                             samples_per_class=cfg.data.samples_per_class))
    ckpt_path = None
    if resume:
        # the checkpoint and every changed setting are checked before the folder is written to
        plan = plan_resume(out, cfg.to_dict(), module.steps_per_epoch)
        if plan.finished(cfg.trainer.max_epochs):
            raise RunAlreadyFinished(
                f"the run in {str(out)!r} has already trained {plan.epochs_done} epochs (trainer.max_epochs="
                f"{cfg.trainer.max_epochs}); nothing was changed. To train longer, resume with a larger "
                "trainer.max_epochs")
        ckpt_path = str(plan.checkpoint)
        for key, (was, now) in plan.changes.items():
            print(f"resume: {key} changes from {was!r} to {now!r}")
        if run is not None and plan.changes:
            run.record(resumes=[{"epochs_done": plan.epochs_done,
                                 "changes": {k: list(v) for k, v in plan.changes.items()}}])
    teachers_val: list[dict[str, Any]] = []
    if trainer.is_global_zero:
        print(start_summary(cfg, built), flush=True)
        if cfg.trainer.limit_val_batches not in (None, 1.0):
            print("warning: trainer.limit_val_batches scores the first batches of the validation split, which may be "
                  "sorted by class; data.val_per_class=N validates on N images of every class instead",
                  file=sys.stderr, flush=True)
        if cfg.teachers and cfg.teacher.evaluate:
            teachers_val = check_teachers(cfg, built, out)
    if run is not None:
        take_ownership(run, " ".join(["kdistill", *sys.argv[1:]]))
        atomic_write_json(out / "config.json", resolved_config(cfg, built))
        atomic_write_json(out / "run.json", card_for(cfg, built.data, {"teachers_val": teachers_val}))
    start = time.perf_counter()
    stop.install()  # a signal while Lightning sets up also stops cleanly
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    except SIGTERMException as exc:  # Lightning's own handler got there first: no checkpoint of this step
        raise RunInterrupted(signal.SIGTERM, None, trainer.current_epoch, trainer.global_step) from exc
    finally:
        stop.restore()
    seconds = time.perf_counter() - start
    if stop.signum is not None:  # a signal during the last epoch's validation, after training ended
        raise RunInterrupted(stop.signum, out / "checkpoints" / "last.ckpt", trainer.current_epoch,
                             trainer.global_step)
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
                   "train_seconds": seconds, "peak_memory_mb": peak_memory_mb(), "teachers_val": teachers_val}
        student = built.distiller.student
        card = card_for(cfg, built.data, metrics)
        if isinstance(student, Cohort):
            metrics["networks"] = {k[9:]: float(v) * 100 for k, v in m.items() if k.startswith("val/top1/")}
            card = card_for(cfg, built.data, metrics)
            # every network, for `kdistill eval`; the export holds only what is deployed
            save_student(student, out / "networks.safetensors", card)
            student, name, kwargs = student.deployed()
            if name is not None:
                card = {**card, "model": name, "model_kwargs": kwargs}
        result.export = save_student(student, out / "student.safetensors", card)
        atomic_write_json(out / "metrics.json", {**metrics, "history": history.rows})
    return result


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, val: ImageTensors | StreamingFolder, mean: list[float], std: list[float],
                   batch_size: int = 256, device: str | torch.device = "cpu", num_workers: int = 0,
                   max_batches: int | None = None) -> dict[str, float]:
    """Top-1/top-5 (%) on ``val`` (its first ``max_batches`` batches when given) and inference images/s."""
    from kdistill.data import BatchAugment

    aug = BatchAugment(mean, std, padding=0, flip=False).to(device)
    model = model.to(device).eval()
    correct1 = correct5 = n = 0
    elapsed = 0.0
    for i, (images, targets, _) in enumerate(make_loader(val, batch_size, train=False, num_workers=num_workers)):
        if max_batches is not None and i >= max_batches:
            break
        x = aug(images.to(device), train=False)
        t0 = time.perf_counter()
        logits = model(x)
        elapsed += time.perf_counter() - t0
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()
        correct1 += (top[:, 0] == targets).sum().item()
        correct5 += (top == targets.view(-1, 1)).any(1).sum().item()
        n += len(targets)
    n = max(n, 1)
    return {"top1": 100 * correct1 / n, "top5": 100 * correct5 / n, "images_per_s": n / max(elapsed, 1e-9)}


def val_batch_limit(limit: float | None, num_batches: int) -> int | None:
    """Batches that ``trainer.limit_val_batches`` lets validation read, as Lightning counts them: a whole
    number is a count, a fraction in (0, 1] a share of ``num_batches`` (at least one); ``None`` means all."""
    if limit is None or (isinstance(limit, float) and limit == 1.0):
        return None
    if isinstance(limit, int) or (isinstance(limit, float) and limit > 1.0):
        return int(limit)
    return max(1, int(num_batches * limit))


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
        card = read_card_file(card_path, path)
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
    workers = cfg.data.num_workers
    metrics = evaluate_model(model, data.val, card["mean"], card["std"], cfg.data.eval_batch_size, num_workers=workers)
    if isinstance(model, Cohort):  # several networks: each one, and their ensemble
        for i, name in enumerate(model.names):
            member = evaluate_model(model.member(i), data.val, card["mean"], card["std"], cfg.data.eval_batch_size,
                                    num_workers=workers)
            metrics[f"top1/{name}"] = member["top1"]
        ensemble = _Ensemble(model)
        metrics["top1/ensemble"] = evaluate_model(ensemble, data.val, card["mean"], card["std"],
                                                  cfg.data.eval_batch_size, num_workers=workers)["top1"]
    return metrics


class _Ensemble(torch.nn.Module):
    """A cohort's ensemble (mean logits of every network), whatever the cohort deploys."""

    def __init__(self, cohort: Cohort):
        super().__init__()
        self.cohort = cohort

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Cohort.ensemble(self.cohort.forward_all(x))


class WithPreprocessing(torch.nn.Module):
    """A student that takes uint8 RGB images of any size (N×3×H×W): resized to the card's input size
    (bilinear), scaled to [0, 1] and normalised inside, so an ONNX runtime needs no preprocessing code."""

    def __init__(self, model: torch.nn.Module, card: dict[str, Any]):
        super().__init__()
        self.model = model
        self.size = tuple(card["input_size"][1:])
        self.register_buffer("mean", torch.tensor(card["mean"]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(card["std"]).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        x = torch.nn.functional.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return self.model((x / 255 - self.mean) / self.std)


def onnx_contract(card: dict[str, Any], preprocess: bool) -> dict[str, Any]:
    """What the ONNX file takes and returns (written into the export's card)."""
    _, h, w = card["input_size"]
    if preprocess:
        inputs = {"name": "images", "dtype": "uint8", "shape": ["N", 3, "H", "W"], "color": "RGB, 0-255",
                  "inside": f"resized to {h}x{w} (bilinear, no antialiasing), divided by 255, normalised with the "
                            "card's mean and std"}
    else:
        inputs = {"name": "images", "dtype": "float32", "shape": ["N", 3, h, w],
                  "preprocessing": "RGB resized to the input size, divided by 255, minus mean, divided by std "
                                   "(the card's preprocessing)"}
    return {"input": inputs, "output": {"name": "logits", "dtype": "float32", "shape": ["N", card["num_classes"]],
                                        "classes": "in the card's classes order"}}


def export(path: str | Path, out: str | Path, onnx: bool = False, onnx_preprocess: bool = False) -> list[Path]:
    """Write the student as safetensors (+ card) and optionally ONNX (``onnx_preprocess``: uint8 images of any
    size in, the resize and normalisation inside); returns the written files."""
    onnx = onnx or onnx_preprocess
    out, card_path, onnx_path = export_paths(out, onnx)  # three distinct files, checked before reading
    model, card = load_from_run(path)
    if isinstance(model, Cohort):  # several networks: what the run deploys
        model, name, kwargs = model.deployed()
        if name is not None:
            card = {**card, "model": name, "model_kwargs": kwargs}
    for target in (out, card_path, onnx_path):
        if target is not None:
            remove_dead_temporaries(target)  # left by an export that was killed while writing
    if onnx:
        card = {**card, "onnx": onnx_contract(card, onnx_preprocess)}
    written = [save_student(model, out, card), card_path]
    if onnx_path is not None:
        model.eval()
        if onnx_preprocess:
            net: torch.nn.Module = WithPreprocessing(model, card).eval()
            dummy = torch.zeros(1, 3, *card["input_size"][1:], dtype=torch.uint8)
            axes = {"images": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}}
        else:
            net, dummy = model, torch.zeros(1, *card["input_size"])
            axes = {"images": {0: "batch"}, "logits": {0: "batch"}}
        atomic_write(onnx_path, lambda tmp: torch.onnx.export(
            net, (dummy,), str(tmp), input_names=["images"], output_names=["logits"],
            dynamic_axes=axes, dynamo=False))
        written.append(onnx_path)
    return written
