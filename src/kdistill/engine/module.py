"""The Lightning module: sums the method's loss dict, logs every term, top-1/top-5, images/s.

Batches arrive as uint8 tensors with their dataset indices; augmentation and normalisation run
on the training device on whole batches (``BatchAugment``).
"""

from __future__ import annotations

import math
import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torchmetrics.classification import MulticlassAccuracy

from kdistill.config import Config
from kdistill.data import BatchAugment
from kdistill.engine.allocator import keep_freed_memory
from kdistill.engine.crop_cache import CachedCropTeachers, CropCache
from kdistill.engine.nonfinite import diagnose
from kdistill.engine.schedule import lr_factor
from kdistill.engine.teacher_cache import CachedTeachers, TeacherCache
from kdistill.methods.base import Batch, StepInfo
from kdistill.models.cohort import Cohort
from kdistill.optim import GroupedOptimizer, make_optimizer
from kdistill.step import Distiller, OwnOptimizerStep, sum_losses


class NonFiniteLossError(RuntimeError):
    """Raised when a loss term becomes NaN or Inf; names the term and the step."""


def rng_state() -> dict[str, Any]:
    """Every global RNG a step draws from (augmentation, dropout, CRD's negatives), in types that
    ``torch.load(weights_only=True)`` accepts."""
    np_name, np_keys, np_pos, np_gauss, np_cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_gauss), float(np_cached)),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state()``."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _average_grad(grad: Tensor) -> Tensor:
    out = grad.clone()
    dist.all_reduce(out)
    return out.div_(dist.get_world_size())


def check_groups_cover(method: str, groups: list[Any], params: list[nn.Parameter]) -> None:
    """A method's optimizer groups must hold every trained parameter exactly once (nothing trained twice,
    nothing silently left untrained)."""
    owner: dict[int, str] = {}
    for g in groups:
        for p in g.params:
            if id(p) in owner:
                raise RuntimeError(f"{method}: a parameter is in optimizer groups {owner[id(p)]!r} and {g.name!r}")
            owner[id(p)] = g.name
    trained = {id(p) for p in params}
    missing = sum(1 for p in params if id(p) not in owner)
    extra = sum(1 for i in owner if i not in trained)
    if missing or extra:
        raise RuntimeError(f"{method}: its optimizer groups leave {missing} trained parameters out and hold {extra} "
                           "that are not trained")


class DistillModule(L.LightningModule):
    """Trains ``distiller.student`` (and the method's modules) with the configured optimizer."""

    def __init__(
        self,
        cfg: Config,
        distiller: Distiller,
        augment: BatchAugment,
        num_classes: int,
        teacher_cache: TeacherCache | CropCache | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.distiller = distiller
        self.augment = augment
        self.teacher_cache = teacher_cache  # cached teacher logits of K views per image
        # where the training step's teacher outputs come from: the cache, or (None) the live pass
        self.teacher_source: CachedTeachers | CachedCropTeachers | None = None
        if isinstance(teacher_cache, CropCache):  # the batches are the stored crops, cut by the workers
            self.teacher_source = CachedCropTeachers(teacher_cache)
        elif teacher_cache is not None:
            self.teacher_source = CachedTeachers(teacher_cache, augment)
        self.num_classes = num_classes
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")
        self.train_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        # a cohort (online methods): every network's accuracy and the ensemble's (last entry)
        self.cohort = distiller.student if isinstance(distiller.student, Cohort) else None
        if self.cohort is not None:
            n = len(self.cohort.members) + 1
            self.member_top1 = nn.ModuleList([MulticlassAccuracy(num_classes, top_k=1, average="micro") for _ in range(n)])
            self.member_top5 = nn.ModuleList(
                [MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro") for _ in range(n)])
        self.steps_per_epoch = 1
        self.own: OwnOptimizerStep | None = None  # the method's own optimizer (MEAL's discriminators)
        self._own_state: dict[str, Any] | None = None
        self._rng_state: dict[str, Any] | None = None
        self._grad_hooks: list[Any] = []
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, self.ddp_ignored_names())

    def ddp_ignored_names(self) -> list[str]:
        """What DDP leaves alone: the frozen teachers (never wrapped: no broadcast of their weights or
        buffers) and the method's own parameters, whose gradients ``on_fit_start`` averages itself
        because their optimizer may step inside the forward pass (MEAL's discriminators)."""
        own = {id(p) for p in self.distiller.method.own_parameters()}
        names = [n for n, p in self.named_parameters() if id(p) in own]
        for prefix, sub in (("distiller.teachers.", self.distiller.teachers),
                            ("distiller.teacher_inputs.", self.distiller.teacher_inputs)):
            names += [prefix + n for n, _ in sub.named_parameters()]
            names += [prefix + n for n, _ in sub.named_buffers()]
        return names

    def sync_batchnorm_stats(self) -> None:
        """Average the student's and the method's BatchNorm running statistics over the processes.

        DDP runs without per-step buffer broadcasts (so teacher buffers and CRD's memory banks are never
        overwritten by rank 0's), so each rank's running statistics drift apart during an epoch; they
        are averaged before validation and checkpointing, so every rank evaluates and saves one model.
        """
        if not _distributed():
            return
        bufs = [b for part in (self.distiller.student, self.distiller.method) for m in part.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                for b in (m.running_mean, m.running_var)]
        if not bufs:
            return
        flat = torch.cat([b.reshape(-1).float() for b in bufs])
        dist.all_reduce(flat)
        flat.div_(dist.get_world_size())
        for b, chunk in zip(bufs, flat.split([b.numel() for b in bufs]), strict=True):
            b.copy_(chunk.view_as(b))

    @property
    def student(self) -> torch.nn.Module:
        return self.distiller.student

    def forward(self, images: Tensor) -> Tensor:
        return self.distiller.student(images)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Batch:
        images, targets, index, *crops = batch  # crops: cut per sample from a crop cache's stored views
        if isinstance(self.teacher_cache, TeacherCache) and self.training:
            return Batch(images, targets, index)  # uint8: training_step augments with the drawn cached views
        return Batch(self.augment(images, train=self.training and self.cfg.data.augment), targets, index,
                     crops[0] if crops else None)

    def on_fit_start(self) -> None:
        if self.device.type == "cpu":
            keep_freed_memory()  # no page faults on re-allocating each step's activations (docs/speed.md)
        scaler = torch.amp.GradScaler(self.device.type) if self.trainer.precision == "16-mixed" else None
        self.own = OwnOptimizerStep(self.distiller.method, scaler)  # built on the training device
        if self._own_state:
            self.own.load_state_dict(self._own_state)
        if _distributed() and not self._grad_hooks:
            self._grad_hooks = [p.register_hook(_average_grad)
                                for p in self.distiller.method.own_parameters() if p.requires_grad]

    def on_train_start(self) -> None:
        if self._rng_state is not None:  # resumed: draw the same augmentations as an uninterrupted run
            set_rng_state(self._rng_state)
            self._rng_state = None

    def on_validation_epoch_start(self) -> None:
        if not self.trainer.sanity_checking:
            self.sync_batchnorm_stats()

    def on_train_epoch_end(self) -> None:
        self.sync_batchnorm_stats()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.own is not None:
            checkpoint["own_optimizer"] = self.own.state_dict()
        checkpoint["rng_state"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._own_state = checkpoint.get("own_optimizer")
        self._rng_state = checkpoint.get("rng_state")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.own is not None:
            # float16: the main loss was scaled before its backward; Lightning unscales the main
            # optimizer's gradients only
            scaler = getattr(self.trainer.precision_plugin, "scaler", None)
            self.own.after_main_backward(float(scaler.get_scale()) if scaler is not None else None)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        info = StepInfo(self.current_epoch, self.global_step, self.trainer.max_epochs or 1)
        own_step = None
        if self.own is not None and self.own.optimizer is not None:
            self.own.sync_lr(self.optimizers().optimizer)
            own_step = self.own.separate_step
        logits, losses = self.distiller.forward_train(batch, info, teachers=self.teacher_source, own_step=own_step)
        for name, value in losses.items():
            if not torch.isfinite(value).all():
                images, outputs = batch.images, None
                if self.teacher_source is not None:  # cached teachers: the views the student trained on
                    seen, outputs = self.teacher_source(batch, self.distiller.method.select_teachers(info))
                    images = seen.images
                cause = diagnose(self.distiller, images, self.augment, losses, outputs)
                raise NonFiniteLossError(
                    f"loss term {name!r} is {value.item()} at epoch {self.current_epoch}, step {self.global_step}; "
                    f"{cause}; training stopped, the last good checkpoint is kept"
                )
        total = sum_losses(losses)
        bs = len(batch.targets)
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach(), batch_size=bs)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=bs)
        self.train_top1(logits.detach(), batch.targets)
        self.log("train/top1", self.train_top1, on_step=False, on_epoch=True, batch_size=bs)
        return total

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        if self.cohort is not None:
            return self._cohort_validation_step(batch)
        logits = self.distiller(batch.images)  # the compiled evaluation pass under trainer.compile
        bs = len(batch.targets)
        self.val_top1(logits, batch.targets)
        self.val_top5(logits, batch.targets)
        self.log("val/loss", F.cross_entropy(logits, batch.targets), sync_dist=True, batch_size=bs)
        self.log("val/top1", self.val_top1, prog_bar=True, batch_size=bs)
        self.log("val/top5", self.val_top5, batch_size=bs)

    def _cohort_validation_step(self, batch: Batch) -> None:
        """Every network of the cohort and their ensemble; ``val/top1`` is logged at the epoch's end."""
        outs = self.cohort.forward_all(batch.images)
        outs.append(Cohort.ensemble(outs))
        for logits, top1, top5 in zip(outs, self.member_top1, self.member_top5, strict=True):
            top1.update(logits, batch.targets)
            top5.update(logits, batch.targets)
        index = self.cohort.deployed_index()
        deployed = outs[-1] if index is None else outs[index]
        self.log("val/loss", F.cross_entropy(deployed, batch.targets), sync_dist=True, batch_size=len(batch.targets))

    def on_validation_epoch_end(self) -> None:
        if self.cohort is None:
            return
        top1 = [float(m.compute()) for m in self.member_top1]  # reduced over the processes
        top5 = [float(m.compute()) for m in self.member_top5]
        for m in (*self.member_top1, *self.member_top5):
            m.reset()
        if self.cohort.deploy == "best" and not self.trainer.sanity_checking:
            self.cohort.best_index.fill_(max(range(len(top1) - 1), key=lambda i: top1[i]))
        index = self.cohort.deployed_index()
        index = len(top1) - 1 if index is None else index
        # identical on every process (the metrics are reduced): sync_dist only silences Lightning's warning
        self.log("val/top1", top1[index], prog_bar=True, sync_dist=True)
        self.log("val/top5", top5[index], sync_dist=True)
        for name, value in zip([*self.cohort.names, "ensemble"], top1, strict=True):
            self.log(f"val/top1/{name}", value, sync_dist=True)

    def configure_optimizers(self) -> Any:
        o = self.cfg.optim
        # weight decay on every parameter, as the reference CIFAR recipes do (RepDistiller, mdistiller)
        params = self.distiller.trainable_parameters()
        groups = self.distiller.method.param_groups()
        if groups is None:
            optimizer = torch.optim.SGD(
                params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay
            )
        else:
            check_groups_cover(self.distiller.method.name, groups, params)
            optimizer = GroupedOptimizer(
                [make_optimizer(g, o.lr, o.momentum, o.nesterov, o.weight_decay) for g in groups], [g.name for g in groups]
            )
        factor = lr_factor(
            o.schedule,
            self.steps_per_epoch,
            self.trainer.max_epochs or 1,
            o.milestones,
            o.gamma,
            o.warmup_epochs,
            o.min_lr / o.lr if o.lr else 0.0,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_epoch_start(self) -> None:
        lr = self.optimizers().param_groups[0]["lr"] if self.trainer.optimizers else math.nan
        self.log("train/lr", lr, on_step=False, on_epoch=True, sync_dist=True)
