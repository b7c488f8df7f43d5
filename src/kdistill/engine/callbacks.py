"""Callbacks and plugins: honest images/s and data time, the per-epoch history, atomic checkpoint writes."""

from __future__ import annotations

import pickle
import time
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from kdistill.checkpoint import DAMAGED_FILE_ERRORS, CheckpointError, unpickling_error
from kdistill.files import atomic_write


class Throughput(L.Callback):
    """Logs ``train/images_per_s`` (whole step incl. data) and ``train/data_time`` per step."""

    def __init__(self) -> None:
        self._last_end: float | None = None
        self._start = 0.0
        self.epoch_images = 0
        self.epoch_time = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_end = time.perf_counter()
        self.epoch_images, self.epoch_time = 0, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self._start = time.perf_counter()
        if self._last_end is not None:
            pl_module.log("train/data_time", self._start - self._last_end, on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, out: Any, batch: Any, idx: int) -> None:
        now = time.perf_counter()
        elapsed = now - (self._last_end if self._last_end is not None else self._start)
        self._last_end = now
        n = len(batch.targets) * trainer.world_size
        self.epoch_images += n
        self.epoch_time += elapsed
        pl_module.log("train/images_per_s", n / max(elapsed, 1e-9), on_step=True, on_epoch=False, prog_bar=True)

    @property
    def images_per_s(self) -> float:
        return self.epoch_images / self.epoch_time if self.epoch_time else 0.0


class History(L.Callback):
    """Per-epoch validation top-1 and train loss, for the summary and the curve plot."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    # at the validation's end: after the module's own epoch-end hook, which logs a cohort's accuracies
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        self.rows.append({
            "epoch": trainer.current_epoch + 1,
            "val_top1": float(m.get("val/top1", float("nan"))),
            "val_top5": float(m.get("val/top5", float("nan"))),
            "train_loss": float(m.get("train/loss", float("nan"))),
            # several networks (online methods): each one's top-1 and the ensemble's
            **{f"val_top1/{k[9:]}": float(v) for k, v in m.items() if k.startswith("val/top1/")},
        })


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file, fsyncs it, then renames it into place, so a
    kill or a full disk never leaves a truncated checkpoint where the previous good one was."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp), what="checkpoint")

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        # our own training checkpoints hold only tensors, numbers, strings and containers
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise unpickling_error(path, exc, "checkpoint ") from exc
        except DAMAGED_FILE_ERRORS as exc:
            raise CheckpointError(f"checkpoint {str(path)!r} is truncated or corrupted ({exc!r}); it was left as "
                                  "it is. Resume from another checkpoint of the run (checkpoints/best-*.ckpt) by "
                                  "copying it to last.ckpt, or start again without --resume") from exc
