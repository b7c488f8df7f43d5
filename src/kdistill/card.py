"""The card of a student export (``<name>.json`` beside ``<name>.safetensors``, also in its header):
checked when read, so a damaged or hand-edited card is a clear error (exit 2), not a traceback."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from kdistill.safe_yaml import short_repr

CARD_FORMAT = "kdistill-student/1"


def _is_int(value: Any, lo: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= lo


def _numbers(value: Any, n: int, positive: bool) -> bool:
    return (isinstance(value, list) and len(value) == n
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    and (v > 0 or not positive) for v in value))


def check_card(card: Any, source: str | Path) -> dict[str, Any]:
    """Return ``card`` if it describes a loadable student, else raise CheckpointError naming the field."""
    from kdistill.checkpoint import CheckpointError

    def bad(field: str, allowed: str) -> CheckpointError:
        value = card.get(field) if isinstance(card, dict) else card
        return CheckpointError(f"the card of {str(source)!r} is malformed: {field} must be {allowed}, got "
                               f"{short_repr(value)}; re-export the student from its run folder")

    if not isinstance(card, dict):
        raise bad("the card", "a JSON object")
    if not isinstance(card.get("model"), str) or not card["model"]:
        raise bad("model", "a model name such as 'cifar.resnet20'")
    if not _is_int(card.get("num_classes")):
        raise bad("num_classes", "an integer >= 1")
    size = card.get("input_size")
    if not (isinstance(size, list) and len(size) == 3 and all(_is_int(v) for v in size)):
        raise bad("input_size", "[channels, height, width], each an integer >= 1")
    for field, positive in (("mean", False), ("std", True)):
        if not _numbers(card.get(field), size[0], positive):
            raise bad(field, f"a list of {size[0]} finite numbers" + (" > 0" if positive else ""))
    if not isinstance(card.get("model_kwargs", {}), dict):
        raise bad("model_kwargs", "a mapping of model options")
    classes = card.get("classes")
    if classes is not None and not (isinstance(classes, list) and len(classes) == card["num_classes"]):
        raise bad("classes", f"a list of {card['num_classes']} class names (num_classes)")
    return card


def read_card_file(path: Path, source: str | Path) -> dict[str, Any]:
    """A JSON card file, checked."""
    from kdistill.checkpoint import CheckpointError

    try:
        card = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"the card {str(path)!r} of {str(source)!r} is not valid JSON ({exc}); "
                              "re-export the student from its run folder") from exc
    return check_card(card, source)


def remove_dead_temporaries(target: Path) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>`` files beside ``target`` whose writing process no longer runs
    (an export killed mid-write); a live process's temporary is left alone."""
    import os

    removed = []
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
        except PermissionError:  # alive, owned by someone else
            continue
    return removed


def export_paths(out: str | Path, onnx: bool) -> tuple[Path, Path, Path | None]:
    """Where an export writes: weights, card and (optionally) ONNX graph, three different files.

    ``out`` must end in ``.safetensors``: the card is ``<name>.json`` and the graph ``<name>.onnx``
    beside it, so an ``--out x.json`` or ``x.onnx`` would write two files to one path."""
    from kdistill.utils import ConfigError

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {str(out)!r}: an export is a .safetensors file (its card is written beside it as "
                          f"{out.with_suffix('.json').name!r}{', its ONNX graph as ' + repr(out.with_suffix('.onnx').name) if onnx else ''}); "
                          f"use for example --out {str(out.with_suffix('.safetensors'))!r}")
    return out, out.with_suffix(".json"), out.with_suffix(".onnx") if onnx else None
