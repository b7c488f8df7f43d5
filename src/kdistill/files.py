"""Writing files so that a crash, a kill or a full disk never leaves a half-written file where a good
one was: every file kdistill writes (checkpoints, exports, cards, caches, run records) goes through
``atomic_write``."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], Any], what: str = "file") -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    On any failure the temporary file is removed and the previous file at ``path`` (if any) is left
    untouched; an ``OSError`` says so, naming ``what`` was written (``"checkpoint"``, ``"file"``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # a normal file's mode (some writers, e.g. safetensors, create 0600)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, f"{exc.strerror or exc} while writing {what}; the previous {what} at this path "
                      "is kept", str(path)) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str, what: str = "file") -> Path:
    """``atomic_write`` of a text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text), what)


def atomic_write_json(path: str | Path, data: Any, what: str = "file") -> Path:
    """``atomic_write`` of ``data`` as indented JSON (``str`` for values JSON does not know)."""
    return atomic_write_text(path, json.dumps(data, indent=2, default=str), what)
