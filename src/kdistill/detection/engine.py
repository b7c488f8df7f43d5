"""Training, evaluation and export of detectors on Lightning (plain or distilled with ReviewKD).

The loss of a step is the sum of the detector's loss dict (plus ``loss_reviewkd`` when
distilling), as in torchvision's detection references. Validation computes COCO AP with
pycocotools on the whole validation split (predictions gathered from every rank). Checkpoints are
written atomically; ``resume=True`` continues from ``checkpoints/last.ckpt``. The teacher is never
part of the Lightning module's state or of DDP.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn

from kdistill.checkpoint import save_student
from kdistill.detection.config import DetectionConfig
from kdistill.detection.data import CocoDetectionData, SyntheticShapesCOCO, check_targets, collate
from kdistill.detection.distiller import ReviewKDDetection
from kdistill.detection.evaluate import coco_evaluate, predictions_to_coco
from kdistill.detection.models import build_detector, detector_kind, load_detector_weights
from kdistill.engine.callbacks import AtomicCheckpointIO
from kdistill.engine.module import NonFiniteLossError
from kdistill.engine.resume import AppendingCSVLogger, config_changes, flatten
from kdistill.files import atomic_write
from kdistill.utils import ConfigError

log = logging.getLogger(__name__)
CARD_FORMAT = "kdistill-detector/1"


# --- data ------------------------------------------------------------------------------------------------
@dataclass
class DetectionData:
    """Train and validation datasets, the validation ground truth (COCO dict) and the class count."""

    train: Any
    val: Any
    ground_truth: dict[str, Any]
    num_classes: int
    categories: list[dict[str, Any]]


def load_detection_data(cfg: DetectionConfig) -> DetectionData:
    """The recipe's data: the synthetic shapes set or a COCO-format folder."""
    d = cfg.data
    if d.name == "synthetic":
        common = {"image_size": d.image_size, "num_classes": d.synthetic_classes, "max_objects": d.max_objects,
                  "mask_format": d.mask_format}
        train = SyntheticShapesCOCO(d.train_size, seed=d.seed, flip=d.flip, **common)
        val = SyntheticShapesCOCO(d.val_size, seed=d.seed + 1_000_003, **common)
        gt, categories, num_classes = val.to_coco_dict(), val.categories, val.num_classes
    else:
        root = Path(d.root or "")
        ann = root / "annotations"
        train = CocoDetectionData(root / d.train_split, ann / f"instances_{d.train_split}.json", train=True,
                                  flip=d.flip, seed=d.seed)
        val = CocoDetectionData(root / d.val_split, ann / f"instances_{d.val_split}.json")
        gt, categories = val.coco, val.categories
        num_classes = max(train.num_classes, val.num_classes)
    if d.num_classes is not None:
        if d.num_classes < num_classes:
            raise ConfigError(f"data.num_classes={d.num_classes} but the annotations use category ids up to "
                              f"{num_classes - 1} (num_classes must be >= {num_classes})")
        num_classes = d.num_classes
    return DetectionData(train, val, gt, num_classes, categories)


class ShardSampler(torch.utils.data.Sampler[int]):
    """A seeded permutation per epoch (or the plain order), rank ``rank``'s every ``world``-th index."""

    def __init__(self, size: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1):
        self.size, self.shuffle, self.seed, self.rank, self.world, self.epoch = size, shuffle, seed, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        if self.world > 1:  # equal shares: pad by repeating, as DistributedSampler does
            order += order[: (-len(order)) % self.world]
        return order

    def __len__(self) -> int:
        return len(self._order()[self.rank :: self.world])

    def __iter__(self):
        return iter(self._order()[self.rank :: self.world])


def make_loader(dataset: Any, batch_size: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1,
                num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A loader of (list of images, list of targets), sharded by rank."""
    sampler = ShardSampler(len(dataset), shuffle, seed, rank, world)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                                       num_workers=num_workers, persistent_workers=num_workers > 0)


# --- models ------------------------------------------------------------------------------------------------
def build_models(cfg: DetectionConfig, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """(student detector, module to train): the student itself or a ``ReviewKDDetection``."""

    def make(dc, role: str) -> nn.Module:
        try:
            return build_detector(dc.model, num_classes, backbone_weights=dc.backbone_weights,
                                  checkpoint=dc.checkpoint, trainable_layers=dc.trainable_layers, norm=dc.norm,
                                  zero_init_residual=dc.zero_init_residual, p6p7_from=dc.p6p7_from, slim=dc.slim,
                                  **dc.kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{role}: {exc}") from exc

    student = make(cfg.student, "student")
    if cfg.method.name == "ce":
        return student, student
    teacher = make(cfg.teacher, "teacher")
    opts = dict(cfg.method.options)
    opts.setdefault("probe_size", cfg.data.image_size)
    try:
        distiller = ReviewKDDetection(student, teacher, **opts)
    except TypeError as exc:
        raise ConfigError(f"method.options: {exc}") from exc
    return student, distiller


def iou_types_for(model_name: str) -> tuple[str, ...]:
    """Boxes for every detector, masks too for Mask R-CNN."""
    return ("bbox", "segm") if detector_kind(model_name) == "maskrcnn" else ("bbox",)


# --- the Lightning module ----------------------------------------------------------------------------------
def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def _mean_over_ranks(values: Tensor) -> Tensor:
    """``values`` averaged over the DDP processes (one all-reduce); unchanged in a single process."""
    if not _distributed():
        return values
    values = values.clone()
    torch.distributed.all_reduce(values)
    return values / torch.distributed.get_world_size()


class NonFiniteDetectionLoss(NonFiniteLossError):
    """A loss of the dict became NaN or Inf (the last good checkpoint is kept)."""


class DetectionModule(L.LightningModule):
    """One training step = sum of the loss dict; validation = COCO AP on the gathered predictions."""

    def __init__(self, cfg: DetectionConfig, student: nn.Module, model: nn.Module, data: DetectionData):
        super().__init__()
        self.cfg, self.model, self.data = cfg, model, data
        self.student_name = cfg.student.model or ""
        self.iou_types = iou_types_for(self.student_name)
        self.steps_per_epoch = 1
        self._results: list[dict[str, Any]] = []
        self._ids: list[int] = []
        self._student = [student]  # same module as (or inside) self.model; a list avoids registering it twice

    @property
    def student(self) -> nn.Module:
        return self._student[0]

    def training_step(self, batch: tuple[list[Tensor], list[dict[str, Tensor]]], batch_idx: int) -> Tensor:
        images, targets = batch
        check_targets(targets, self.data.num_classes)
        losses = self.model(images, targets)
        loss = sum(losses.values())
        n = len(images)
        # one all-reduce: the logged values are the mean over the processes, and a loss that is not finite
        # on any rank is not finite in the mean, so every rank stops together instead of one hanging
        logged = _mean_over_ranks(torch.stack([*(v.detach().float() for v in losses.values()), loss.detach().float()]))
        bad = [k for k, v in zip(losses, logged, strict=False) if not torch.isfinite(v)]
        if bad:
            raise NonFiniteDetectionLoss(f"loss {', '.join(bad)} is not finite at step {self.global_step}; the last "
                                         "good checkpoint is kept (lower optim.lr or check the data)")
        for key, value in zip([*losses, "loss"], logged, strict=True):
            self.log(f"train/{key}", value, batch_size=n, on_step=True, on_epoch=True, prog_bar=key == "loss")
        return loss

    def on_train_epoch_start(self) -> None:
        for dataset in (self.data.train,):
            dataset.set_epoch(self.current_epoch)
        sampler = self.trainer.train_dataloader.sampler if self.trainer.train_dataloader is not None else None
        if isinstance(sampler, ShardSampler):
            sampler.set_epoch(self.current_epoch)

    def on_validation_epoch_start(self) -> None:
        self._results, self._ids = [], []
        self.sync_batchnorm_stats()

    def on_train_epoch_end(self) -> None:
        self.sync_batchnorm_stats()

    def sync_batchnorm_stats(self) -> None:
        """Average the BatchNorm running statistics of the trained modules (student, ABFs) over the
        processes. DDP runs here without per-step buffer broadcasts (see ``make_strategy``), so each rank's
        statistics drift apart during an epoch; averaged before validation and checkpointing, every rank
        evaluates and saves one model. The teacher is outside ``self.model`` and never changes."""
        if not _distributed():
            return
        bufs = [b for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                and m.track_running_stats and m.running_mean is not None for b in (m.running_mean, m.running_var)]
        if bufs:
            flat = _mean_over_ranks(torch.cat([b.reshape(-1).float() for b in bufs]))
            for b, chunk in zip(bufs, flat.split([b.numel() for b in bufs]), strict=True):
                b.copy_(chunk.view_as(b))

    def validation_step(self, batch: tuple[list[Tensor], list[dict[str, Tensor]]], batch_idx: int) -> None:
        images, targets = batch
        ids = [int(t["image_id"]) for t in targets]
        self._results += predictions_to_coco(self.model(images), ids)
        self._ids += ids

    def on_validation_epoch_end(self) -> None:
        results, ids = self._results, self._ids
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (results, ids))
            results = [r for part, _ in gathered for r in part]
            ids = [i for _, part in gathered for i in part]
        # score exactly the images that were evaluated (all of them unless limit_val_batches is set)
        seen, gt = set(ids), self.data.ground_truth
        gt = {**gt, "images": [i for i in gt["images"] if i["id"] in seen],
              "annotations": [a for a in gt["annotations"] if a["image_id"] in seen]}
        metrics = coco_evaluate(gt, results, self.iou_types, self.cfg.eval_backend)
        for key, value in metrics.items():
            self.log(f"val/{key}", value)
        self._results, self._ids = [], []

    def configure_optimizers(self) -> Any:
        o = self.cfg.optim
        params = (list(self.model.trainable_parameters()) if isinstance(self.model, ReviewKDDetection)
                  else [p for p in self.model.parameters() if p.requires_grad])
        norm_ids = {id(p) for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
                    for p in m.parameters(recurse=False)}
        groups = [{"params": [p for p in params if id(p) not in norm_ids], "weight_decay": o.weight_decay},
                  {"params": [p for p in params if id(p) in norm_ids], "weight_decay": o.norm_weight_decay}]
        opt = torch.optim.SGD([g for g in groups if g["params"]], lr=o.lr, momentum=o.momentum)
        per_epoch = max(1, self.steps_per_epoch)

        def factor(step: int) -> float:
            warm = 1.0
            if step < o.warmup_iters:
                alpha = step / o.warmup_iters
                warm = o.warmup_factor * (1 - alpha) + alpha
            return warm * o.gamma ** sum(step // per_epoch >= m for m in o.milestones)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class _DataModule(L.LightningDataModule):
    def __init__(self, cfg: DetectionConfig, data: DetectionData):
        super().__init__()
        self.cfg, self.data = cfg, data

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        t, d = self.trainer, self.cfg.data
        return make_loader(self.data.train, d.batch_size, True, self.cfg.seed, t.global_rank, t.world_size,
                           d.num_workers)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        t, d = self.trainer, self.cfg.data
        return make_loader(self.data.val, d.eval_batch_size, False, 0, t.global_rank, t.world_size, d.num_workers)


# --- runs --------------------------------------------------------------------------------------------------
def card_for(cfg: DetectionConfig, data: DetectionData, metrics: dict[str, Any]) -> dict[str, Any]:
    """What an export needs to rebuild the detector, plus where it came from."""
    s = cfg.student
    return {
        "format": CARD_FORMAT, "task": "detection", "model": s.model, "num_classes": data.num_classes,
        "model_options": {"trainable_layers": s.trainable_layers, "norm": s.norm, "p6p7_from": s.p6p7_from,
                          "slim": s.slim, **s.kwargs},
        "categories": data.categories, "method": cfg.method.name, "teacher": cfg.teacher.model,
        "metrics": metrics, "recipe": cfg.to_dict(),
    }


@dataclass
class DetectionResult:
    """What a finished detection run reports."""

    output: Path
    metrics: dict[str, float]
    seconds: float
    export: Path | None


def _trainer(cfg: DetectionConfig, out: Path, monitor: str) -> L.Trainer:
    from kdistill.engine.run import make_strategy

    t = cfg.trainer
    best = ModelCheckpoint(dirpath=out / "checkpoints", filename="best-epoch{epoch:03d}", auto_insert_metric_name=False,
                           monitor=monitor, mode="max", save_top_k=1)
    last = ModelCheckpoint(dirpath=out / "checkpoints", filename="last", save_top_k=1, monitor=None,
                           every_n_epochs=1, enable_version_counter=False)
    extra = {k: v for k, v in (("limit_train_batches", t.limit_train_batches),
                                ("limit_val_batches", t.limit_val_batches)) if v is not None}
    return L.Trainer(
        max_epochs=t.max_epochs, accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
        strategy=make_strategy(t), precision=t.precision, log_every_n_steps=t.log_every_n_steps,
        check_val_every_n_epoch=t.check_val_every_n_epoch, gradient_clip_val=t.gradient_clip_val,
        callbacks=[best, last], logger=[AppendingCSVLogger(out, name="logs", version="")], plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False, enable_progress_bar=t.progress_bar, enable_model_summary=False,
        num_sanity_val_steps=0, **extra)


def fit_detection(cfg: DetectionConfig, resume: bool = False, overwrite: bool = False) -> DetectionResult:
    """Train (method ``ce``) or distill (``reviewkd``) a detector; export the final student.

    The output folder is claimed as for classification (``engine.rundir``): a new run needs a new or
    empty folder (``overwrite`` moves an old one aside, never deletes it), ``resume`` continues the run
    found there, and the folder is locked while the run uses it."""
    from kdistill.engine.rundir import claim, ensure_writable, is_main_process

    if not is_main_process():  # other ranks of a distributed launch write through rank 0
        return _fit_detection(cfg, resume, ensure_writable(cfg.output), None)
    run = claim(cfg.output, resume=resume, overwrite=overwrite)
    try:
        return _fit_detection(cfg, resume, run.path, run)
    except ConfigError:
        run.discard_if_unused()
        raise
    finally:
        run.release()


# settings a resumed run may change: how long it trains, what is logged and how it is scored, not what the
# saved weights, optimiser and schedule state mean (as for classification, engine/resume.py)
RESUME_MAY_CHANGE = ("description", "published", "eval_backend", "trainer.max_epochs", "trainer.progress_bar",
                     "trainer.log_every_n_steps", "trainer.check_val_every_n_epoch", "trainer.limit_val_batches",
                     "trainer.accelerator", "data.num_workers", "data.eval_batch_size")


def check_resume_config(out: Path, cfg: DetectionConfig) -> None:
    """Refuse ``--resume`` under a recipe that the saved state cannot follow (another model, data, learning
    rate, ...): ConfigError naming the key and both values, raised before anything is written."""
    card_path = out / "run.json"
    if not card_path.is_file():
        return
    try:
        old = json.loads(card_path.read_text()).get("recipe")
    except ValueError as exc:
        raise ConfigError(f"--resume: the run's {str(card_path)!r} is not valid JSON ({exc}); nothing was changed") from exc
    if not isinstance(old, dict):
        return
    saved = flatten(json.loads(json.dumps(old, default=str)))  # keys newer than the run keep their defaults
    refused = {k: v for k, v in config_changes(old, cfg.to_dict()).items()
               if k in saved and not any(k == a or k.startswith(a + ".") for a in RESUME_MAY_CHANGE)}
    if refused:
        key, (was, now) = next(iter(refused.items()))
        more = f" (and {len(refused) - 1} more: {', '.join(list(refused)[1:6])})" if len(refused) > 1 else ""
        raise ConfigError(f"--resume: {key} is {now!r} but the run was trained with {was!r}{more}; the checkpoint cannot "
                          f"continue under another value. Nothing was changed. On resume only these may change: "
                          f"{', '.join(RESUME_MAY_CHANGE)}. Start a new run (another output=, or --overwrite) instead")


def _fit_detection(cfg: DetectionConfig, resume: bool, out: Path, run: Any) -> DetectionResult:
    from kdistill.engine.rundir import take_ownership

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    data = load_detection_data(cfg)
    student, model = build_models(cfg, data.num_classes)
    module = DetectionModule(cfg, student, model, data)
    trainer = _trainer(cfg, out, "val/bbox_AP")
    world = max(1, trainer.world_size)
    module.steps_per_epoch = math.ceil(math.ceil(len(data.train) / world) / cfg.data.batch_size)
    if cfg.trainer.limit_train_batches is not None:
        limit = cfg.trainer.limit_train_batches
        module.steps_per_epoch = int(limit) if limit >= 1 else max(1, int(module.steps_per_epoch * limit))
    ckpt_path = None
    if resume:
        last = out / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise ConfigError(f"--resume: no checkpoint at {str(last)!r}")
        checkpoint = AtomicCheckpointIO().load_checkpoint(last)  # refuse a damaged checkpoint before any write
        check_resume_config(out, cfg)
        done = int(checkpoint.get("epoch", -1)) + 1
        if done >= cfg.trainer.max_epochs:
            from kdistill.engine.run import RunAlreadyFinished

            raise RunAlreadyFinished(f"the run in {str(out)!r} has already trained {done} epochs (trainer.max_epochs="
                              f"{cfg.trainer.max_epochs}); nothing was changed. To train longer, resume with a larger "
                              "trainer.max_epochs")
        ckpt_path = str(last)
    if run is not None:  # every check has passed: the first write into the folder
        take_ownership(run, " ".join(["kdistill", *sys.argv[1:]]))
    text = json.dumps(card_for(cfg, data, {}), indent=2, default=str)
    atomic_write(out / "run.json", lambda tmp: Path(tmp).write_text(text))
    start = time.perf_counter()
    trainer.fit(module, datamodule=_DataModule(cfg, data), ckpt_path=ckpt_path)
    seconds = time.perf_counter() - start
    if trainer.interrupted:
        raise KeyboardInterrupt
    metrics = {k.removeprefix("val/"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    export = None
    if trainer.is_global_zero:
        card = card_for(cfg, data, {**metrics, "epochs": trainer.current_epoch, "train_seconds": seconds})
        export = save_student(student, out / "student.safetensors", card)
        text = json.dumps({**metrics, "train_seconds": seconds}, indent=2)
        atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(text))
    return DetectionResult(out, metrics, seconds, export)


def _read_detector_card(path: Path) -> dict[str, Any]:
    """A detector export's card: the JSON beside it, else the safetensors header (the classification
    card reader would insist on an image input size)."""
    from kdistill.checkpoint import CheckpointError

    if not path.is_file():
        raise CheckpointError(f"detector export {str(path)!r} does not exist")
    card_path = path.with_suffix(".json")
    if card_path.is_file():
        return json.loads(card_path.read_text())
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
    if "kdistill_card" not in meta:
        raise CheckpointError(f"{str(path)!r} has no kdistill card")
    return json.loads(meta["kdistill_card"])


def load_detector_from_run(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The student detector of a run folder, an export (``.safetensors``) or a checkpoint (``.ckpt``)."""
    from kdistill.checkpoint import CheckpointError

    path = Path(path)
    if path.is_dir():
        path = path / "student.safetensors"
    if path.suffix == ".ckpt":
        card = json.loads((path.parent.parent / "run.json").read_text())
        state = AtomicCheckpointIO().load_checkpoint(path)["state_dict"]
        prefix = "model.student." if any(k.startswith("model.student.") for k in state) else "model."
        weights = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    elif path.suffix == ".safetensors":
        card = _read_detector_card(path)
        weights = None
    else:
        raise CheckpointError(f"{str(path)!r}: expected a run folder, a .safetensors export or a .ckpt checkpoint")
    if card.get("task") != "detection":
        raise CheckpointError(f"{str(path)!r} is not a detection run")
    opts = dict(card.get("model_options", {}))
    model = build_detector(card["model"], card["num_classes"], **opts)
    if weights is None:
        load_detector_weights(model, path, num_classes=card["num_classes"])
    else:
        model.load_state_dict(weights, strict=True)
    return model.eval(), card


def evaluate_detection(path: str | Path, cfg: DetectionConfig | None = None,
                       overrides: list[str] | None = None) -> dict[str, float]:
    """COCO AP of a run's student on the validation split of its recipe's data (or ``cfg``'s); ``overrides``
    (``key=value``) change the run's own recipe, e.g. ``eval_backend=pycocotools``."""
    from kdistill.detection.config import build_detection_config
    from kdistill.detection.evaluate import evaluate_detector

    model, card = load_detector_from_run(path)
    cfg = cfg or build_detection_config(None, overrides, base=copy.deepcopy(card["recipe"]))
    data = load_detection_data(cfg)
    if data.num_classes != card["num_classes"]:
        raise ConfigError(f"the detector has {card['num_classes']} classes (background included) but the data needs "
                          f"{data.num_classes}")
    loader = make_loader(data.val, cfg.data.eval_batch_size, False, 0, num_workers=cfg.data.num_workers)
    start = time.perf_counter()
    metrics = evaluate_detector(model, loader, data.ground_truth, iou_types_for(card["model"]),
                                backend=cfg.eval_backend)
    metrics["images_per_s"] = len(data.val) / (time.perf_counter() - start)
    return metrics


def export_detection(path: str | Path, out: str | Path) -> list[Path]:
    """Write a run's student detector as safetensors + card; refuses to overwrite an existing file."""
    model, card = load_detector_from_run(path)
    out = Path(out)
    if out.exists():
        raise ConfigError(f"{str(out)!r} exists; choose another --out (exports never overwrite)")
    return [save_student(model, out, card), out.with_suffix(".json")]
