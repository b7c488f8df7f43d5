"""Callbacks and plugins: honest images/s and data time, the per-epoch history, atomic checkpoint writes."""

from __future__ import annotations

import pickle
import time
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

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


NOT_LOSSES = ("images_per_s", "data_time", "top1", "lr")


class History(L.Callback):
    """Per-epoch rows (validation top-1/top-5 in percent, the epoch's mean loss and loss terms) and one plain
    text line per epoch on stdout, whatever the terminal: loss terms, val top-1/top-5, images/s, time left.
    Rows are appended for the epochs that validated; ``print_lines=False`` keeps quiet (e.g. under a test)."""

    def __init__(self, speed: Throughput | None = None, print_lines: bool = True) -> None:
        self.rows: list[dict[str, float]] = []
        self.speed = speed
        self.print_lines = print_lines
        self._sums: dict[str, float] = {}
        self._count = 0
        self._validated = False
        self._fit_start = 0.0
        self._first_epoch = 0

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}  # saved in checkpoints: a resumed run appends to the history

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = list(state.get("rows", []))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self._first_epoch = trainer.current_epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sums, self._count, self._validated = {}, 0, False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, out: Any, batch: Any, idx: int) -> None:
        n = len(batch.targets)
        for key, value in trainer.callback_metrics.items():
            name = key.split("/", 1)[1] if key.startswith("train/") else None
            if name and name not in NOT_LOSSES and not name.endswith(("_step", "_epoch")):
                self._sums[name] = self._sums.get(name, 0.0) + float(value) * n
        self._count += n

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validated = not trainer.sanity_checking

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        losses = {k: v / max(self._count, 1) for k, v in self._sums.items()}
        m = trainer.callback_metrics
        epoch = trainer.current_epoch + 1
        if self._validated:
            self.rows.append({
                "epoch": epoch,
                "val_top1": 100 * float(m.get("val/top1", float("nan"))),
                "val_top5": 100 * float(m.get("val/top5", float("nan"))),
                "train_loss": losses.get("loss", float("nan")),
                **{f"train_{k}": v for k, v in losses.items() if k != "loss"},
                # several networks (online methods): each one's top-1 and the ensemble's
                **{f"val_top1/{k[9:]}": 100 * float(v) for k, v in m.items() if k.startswith("val/top1/")},
            })
        if self.print_lines and trainer.is_global_zero:
            print(self.epoch_line(trainer, epoch, losses), flush=True)

    def epoch_line(self, trainer: L.Trainer, epoch: int, losses: dict[str, float]) -> str:
        """``epoch 3/12  loss 1.234 (ce 0.456, kd 0.778)  val top-1 45.20%  top-5 80.10%  1234 img/s  2.1s  left 19s``."""
        total = trainer.max_epochs or epoch
        terms = ", ".join(f"{k} {v:.4g}" for k, v in losses.items() if k != "loss")
        parts = [f"epoch {epoch}/{total}", f"loss {losses.get('loss', float('nan')):.4g}" + (f" ({terms})" if terms else "")]
        if self._validated:
            top1 = 100 * float(trainer.callback_metrics.get("val/top1", float("nan")))
            top5 = 100 * float(trainer.callback_metrics.get("val/top5", float("nan")))
            parts.append(f"val top-1 {top1:.2f}%  top-5 {top5:.2f}%")
        if self.speed is not None:
            parts.append(f"{self.speed.images_per_s:.0f} img/s")
        elapsed = time.perf_counter() - self._fit_start
        done = epoch - self._first_epoch
        parts.append(f"{elapsed:.1f}s  left {elapsed / max(done, 1) * (total - epoch):.0f}s")
        return "  ".join(parts)


class EpochCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` whose ``{epoch}`` counts from 1, as the history and the printed lines do."""

    def format_checkpoint_name(self, metrics: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> str:
        if "epoch" in metrics:
            metrics = {**metrics, "epoch": metrics["epoch"] + 1}
        return super().format_checkpoint_name(metrics, *args, **kwargs)


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
