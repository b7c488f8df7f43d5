"""SIGTERM and SIGINT stop a run cleanly: the current step finishes, ``last.ckpt`` is written
atomically at that step, the user is told how to resume, and the process exits with 128 + the signal
number (143 for SIGTERM, 130 for SIGINT). A second signal ends the process at once; atomic writes
leave either the old or the new file, and the next ``--resume`` removes the temporary ones.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

HANDLED = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(Exception):
    """The run stopped on a signal after writing its checkpoint; ``exit_code`` is 128 + signal."""

    def __init__(self, signum: int, checkpoint: Path | None, epoch: int, step: int):
        self.signum, self.checkpoint, self.epoch, self.step = signum, checkpoint, epoch, step
        name = signal.Signals(signum).name
        where = (f"the checkpoint of epoch {epoch}, step {step} is at {checkpoint}" if checkpoint
                 else "no checkpoint was written")
        super().__init__(f"stopped by {name} after finishing the current step; {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopOnSignal(L.Callback):
    """Turns SIGTERM / SIGINT into a clean stop at the next step boundary (see the module doc).

    Installed while ``trainer.fit`` runs; replaces Lightning's own SIGTERM handler (which stops
    without a checkpoint) once training starts. Under DDP the flag is agreed on by all ranks each
    step, so every rank stops after the same step and the checkpoint is written collectively."""

    def __init__(self, checkpoint: Path):
        self.checkpoint = checkpoint
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    # --- handlers ---------------------------------------------------------------------------
    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # second signal: leave now; atomic writes keep every file whole
            os.write(2, f"\n{signal.Signals(signum).name} again: stopping at once\n".encode())
            os._exit(128 + signum)
        self.signum = signum
        os.write(2, f"\n{signal.Signals(signum).name}: finishing the current step, then writing a checkpoint "
                    "(send it again to stop at once)\n".encode())

    def install(self) -> None:
        """Take over SIGTERM and SIGINT (main thread only; elsewhere signals stay as they are)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in HANDLED:
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    def restore(self) -> None:
        """Give the signals back to whoever had them before ``install``."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    # --- callback hooks --------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.install()  # after Lightning registered its SIGTERM handler: ours replaces it

    def _agreed(self, trainer: L.Trainer) -> int | None:
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            flag = torch.tensor([self.signum or 0], device=trainer.strategy.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return int(flag.item()) or None
        return self.signum

    def _stop(self, trainer: L.Trainer, save: bool) -> None:
        signum = self._agreed(trainer)
        if signum is None:
            return
        self.signum = signum
        if save:
            trainer.save_checkpoint(self.checkpoint)  # atomic (AtomicCheckpointIO), collective under DDP
        kept = self.checkpoint if self.checkpoint.is_file() else None
        raise RunInterrupted(signum, kept, trainer.current_epoch, trainer.global_step)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        # a signal during setup or the last validation: stop before the epoch's first step; the
        # end-of-epoch checkpoint already holds this state (validation draws no random numbers)
        if idx == 0:
            self._stop(trainer, save=False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, out: Any, batch: Any,
                           idx: int) -> None:
        self._stop(trainer, save=True)


def resume_hint(argv: list[str] | None = None) -> str:
    """The command that continues this run."""
    args = list(sys.argv[1:] if argv is None else argv)
    args = [a for a in args if a not in ("--resume", "--overwrite")]
    return "kdistill " + " ".join([*args, "--resume"])
