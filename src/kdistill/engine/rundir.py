"""Run folders are owned: a run writes only into a folder that is new or that a kdistill run created.

A run folder carries a marker file (``.kdistill-run``, JSON: who created it, when, and who holds it
now). A new run refuses a folder that holds anything (exit 2 naming it) unless the user says
``--overwrite``, which renames the old folder aside (``<name>.replaced-<time>``), never deleting it,
or ``--resume``, which continues the run found there. While a run uses its folder it holds an
exclusive ``flock`` on the folder itself: a second process is refused, and the kernel drops the lock
when its holder dies, so the folder of a killed run is taken over without a stale lock to clear.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdistill.files import atomic_write_json
from kdistill.utils import ConfigError

log = logging.getLogger(__name__)

MARKER = ".kdistill-run"
TEMP_PATTERN = ".*.tmp-*"  # what an atomic write leaves when its process is killed mid-write


@dataclass
class RunFolder:
    """An owned, locked run folder; ``release()`` (or process exit) drops the lock."""

    path: Path
    fd: int
    resumed: bool
    replaced: Path | None = None
    created: bool = False  # the folder did not exist before this run

    def discard_if_unused(self) -> None:
        """Remove the folder again if this run created it and wrote nothing (a check failed after claiming)."""
        if self.created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

    def release(self) -> None:
        """Drop the lock (the kernel also drops it when the process ends)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def record(self, **facts: Any) -> None:
        """Add ``facts`` to the marker (for example the changes applied on resume)."""
        marker = read_marker(self.path) or {}
        for key, value in facts.items():
            if isinstance(value, list):
                marker.setdefault(key, []).extend(value)
            else:
                marker[key] = value
        _write_marker(self.path, marker)


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a distributed launch (those never claim the folder)."""
    return all(os.environ.get(name, "0") in ("", "0") for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a run folder, or None when there is none (or it is not ours)."""
    path = folder / MARKER
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_marker(folder: Path, data: dict[str, Any]) -> None:
    atomic_write_json(folder / MARKER, data)


def _holder(folder: Path) -> str:
    marker = read_marker(folder) or {}
    pid, host = marker.get("pid"), marker.get("host")
    return f"process {pid} on {host}" if pid else "another process"


def _lock(folder: Path) -> int:
    """An exclusive, non-blocking flock on the folder; ConfigError naming the holder if taken."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise ConfigError(f"output folder {str(folder)!r} is in use by {_holder(folder)}; wait for it to finish, "
                          "or choose another output=") from exc
    return fd


def is_locked(folder: Path) -> bool:
    """True while a live process holds the folder's lock."""
    try:
        fd = _lock(folder)
    except ConfigError:
        return True
    os.close(fd)
    return False


def _contents(folder: Path) -> list[str]:
    # another rank's write probe (ensure_writable) is not content
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".write-test-"))


def clean_temp_files(folder: Path) -> list[Path]:
    """Remove the temporary files that killed atomic writes left in ``folder`` (and ``checkpoints/``).

    Only called while holding the folder's lock, so no live writer owns them."""
    removed = []
    for sub in (folder, folder / "checkpoints"):
        if sub.is_dir():
            for tmp in sub.glob(TEMP_PATTERN):
                if tmp.is_file():
                    tmp.unlink()
                    removed.append(tmp)
    if removed:
        log.warning("removed %d temporary file(s) left by an interrupted write in %s", len(removed), folder)
    return removed


def _aside_name(folder: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = folder.with_name(f"{folder.name}.replaced-{stamp}")
    n = 1
    while candidate.exists():
        n += 1
        candidate = folder.with_name(f"{folder.name}.replaced-{stamp}-{n}")
    return candidate


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


def claim(output: str | Path, resume: bool = False, overwrite: bool = False) -> RunFolder:
    """Own and lock the run folder ``output`` before anything is written into it.

    New run: the folder must not exist or be empty; with ``overwrite`` a non-empty one is renamed
    aside first. Resume: the folder must hold a kdistill run (its marker, or ``config.json`` /
    ``run.json`` for runs made before markers). Raises ConfigError (exit 2) naming the folder otherwise; nothing is written.
    """
    folder = Path(output)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: --resume continues the run in "
                          f"{str(folder)!r}, --overwrite moves it aside and starts a new one")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"output {str(folder)!r} is a file, not a folder; choose another output=")
    if resume:
        if not folder.is_dir():
            raise ConfigError(f"--resume: there is no run at {str(folder)!r}")
        # runs made before markers: a classification run's config.json, a detection run's run.json
        if read_marker(folder) is None and not any((folder / n).is_file() for n in ("config.json", "run.json")):
            raise ConfigError(f"--resume: {str(folder)!r} does not hold a kdistill run (no {MARKER} marker)")
        fd = _lock(folder)
        return RunFolder(folder, fd, resumed=True)
    replaced = None
    if folder.is_dir() and _contents(folder):
        if not overwrite:
            what = "a kdistill run" if read_marker(folder) is not None else "files that are not a new kdistill run"
            raise ConfigError(f"output folder {str(folder)!r} already holds {what}; nothing was changed. "
                              "Continue it with --resume, move it aside with --overwrite, or choose another output=")
        fd = _lock(folder)  # never move a folder a live run is writing into
        os.close(fd)
        replaced = _aside_name(folder)
        try:
            folder.rename(replaced)
        except OSError as exc:
            raise ConfigError(f"--overwrite: cannot move {str(folder)!r} aside to {str(replaced)!r}: "
                              f"{exc.strerror or exc}") from exc
        log.warning("moved the previous contents of %s to %s", folder, replaced)
        print(f"moved the previous contents of {folder} to {replaced}")
    created = not folder.exists()
    ensure_writable(folder)
    fd = _lock(folder)
    if _contents(folder):  # another run got here first
        os.close(fd)
        raise ConfigError(f"output folder {str(folder)!r} was filled by another process while starting; "
                          "nothing was changed")
    return RunFolder(folder, fd, resumed=False, replaced=replaced, created=created)


def take_ownership(run: RunFolder, command: str) -> None:
    """Write the marker (new run) or update its holder (resume), and clean temporary files.

    Called once every check has passed: this is the first write into the folder."""
    marker = read_marker(run.path) or {"format": "kdistill-run/1", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                       "command": command}
    previous = marker.get("pid")
    if run.resumed and previous and previous != os.getpid():
        log.info("taking over %s from process %s, which ended without releasing it", run.path, previous)
    marker.update(pid=os.getpid(), host=socket.gethostname(), started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if run.replaced is not None:
        marker["replaced"] = str(run.replaced)
    if run.resumed:
        clean_temp_files(run.path)
    _write_marker(run.path, marker)
