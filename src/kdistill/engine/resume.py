"""Safe resume: the recipe of ``--resume`` is compared with the run's before anything is written.

A checkpoint records the configuration it was trained with (key ``kdistill_config``; older runs:
their ``config.json``). On resume only settings that do not change what the saved state means may
differ (how long to train, how to log, where the data cache lives, ...); they are applied and
recorded in the run's marker. Any other difference (model, method, learning rate, data, ...) is a
ConfigError naming the key, raised before the folder is touched. A run that has already trained
``trainer.max_epochs`` epochs is reported as finished and left unchanged.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from kdistill.utils import ConfigError

CONFIG_KEY = "kdistill_config"  # the run's configuration inside each checkpoint

# Settings that may change on --resume: they decide how long to train, what is logged and where
# caches live, not what the saved weights, optimizer and schedule state mean.
RESUME_MAY_CHANGE = (
    "description",
    "published",
    "trainer.max_epochs",
    "trainer.progress_bar",
    "trainer.log_every_n_steps",
    "trainer.check_val_every_n_epoch",
    "trainer.limit_val_batches",
    "trainer.accelerator",
    "trainer.threads",
    "data.num_workers",
    "data.eval_batch_size",
    "data.cache_dir",
    "data.download",
    "data.val_per_class",
    "teacher.allow_untrained",
    "teacher.evaluate",
)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "l": [{"m": 2}]}`` → ``{"a.b": 1, "l.0.m": 2}`` (empty containers kept as leaves)."""
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(tree, list) and tree and any(isinstance(v, (dict, list)) for v in tree):
        out = {}
        for i, value in enumerate(tree):
            out.update(flatten(value, f"{prefix}.{i}" if prefix else str(i)))
        return out
    return {prefix: tree}


def _may_change(key: str) -> bool:
    return any(key == allowed or key.startswith(allowed + ".") for allowed in RESUME_MAY_CHANGE)


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))  # tuples vs lists, numbers as JSON reads them


@dataclass
class ResumePlan:
    """What ``--resume`` will do: the checkpoint, the epochs already trained, the changes to apply."""

    checkpoint: Path
    epochs_done: int
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def finished(self, max_epochs: int) -> bool:
        return self.epochs_done >= max_epochs


def saved_config(folder: Path, checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The configuration the checkpoint was trained with (its own copy, else the run's config.json)."""
    if isinstance(checkpoint.get(CONFIG_KEY), dict):
        return checkpoint[CONFIG_KEY]
    path = folder / "config.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise ConfigError(f"--resume: the run's {str(path)!r} is not valid JSON ({exc}); nothing was changed") from exc
        return data if isinstance(data, dict) else None
    return None


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Every key whose value differs between two configuration dicts, with (old, new)."""
    a, b = flatten(_normalise(old)), flatten(_normalise(new))
    # ``output`` is where the run is, not how it trains: a run folder may be moved and resumed
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k != "output"}


def plan_resume(folder: Path, new_config: dict[str, Any], steps_per_epoch: int) -> ResumePlan:
    """Read and check ``<folder>/checkpoints/last.ckpt`` against ``new_config``; nothing is written.

    Raises ConfigError (exit 2) for a missing or damaged checkpoint and for every change that the
    saved state cannot follow, naming the key and the two values."""
    from kdistill.engine.callbacks import AtomicCheckpointIO

    last = folder / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise ConfigError(f"--resume: no checkpoint at {str(last)!r}")
    checkpoint = AtomicCheckpointIO().load_checkpoint(last)  # refuses a damaged or unsafe file
    old = saved_config(folder, checkpoint)
    changes: dict[str, tuple[Any, Any]] = {}
    if old is not None:
        changes = config_changes(old, new_config)
        refused = {k: v for k, v in changes.items() if not _may_change(k)}
        if refused:
            key, (was, now) = next(iter(refused.items()))
            more = f" (and {len(refused) - 1} more: {', '.join(list(refused)[1:6])})" if len(refused) > 1 else ""
            raise ConfigError(
                f"--resume: {key} is {now!r} but the run was trained with {was!r}{more}; the checkpoint cannot "
                f"continue under another value. Nothing was changed. On resume only these may change: "
                f"{', '.join(RESUME_MAY_CHANGE)}. Start a new run (another output=, or --overwrite) instead"
            )
    global_step = int(checkpoint.get("global_step", 0))
    return ResumePlan(last, global_step // max(1, steps_per_epoch), changes)


class RecordConfig(L.Callback):
    """Stores the run's configuration in every checkpoint, so ``--resume`` can compare against it."""

    def __init__(self, config: dict[str, Any]):
        self.config = config

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_KEY] = self.config


class ResumableLoader(torch.utils.data.DataLoader):
    """A training loader whose position (epoch, batches trained in it) is saved in checkpoints, so a
    run stopped mid-epoch continues with the next batch instead of repeating or skipping any.

    ``progress`` returns how many batches of the current epoch have been trained."""

    progress: Callable[[], int] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "batches_done": int(self.progress() if self.progress else 0)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume(int(state["epoch"]), int(state["batches_done"]))


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing ``metrics.csv``; on resume the history is kept and
    new rows are appended (under a header that is the union of old and new columns)."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as fh:
                header = next(csv.reader(fh), [])
            self.metrics_keys = sorted(header)


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to the run's ``metrics.csv`` instead of replacing it."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
