"""Loading and saving weights safely (README.md, "Security").

Only ``torch.load(..., weights_only=True)`` or safetensors: a pickle with executable content is
refused, never run. Writes go to a temporary file first and are renamed into place, so a kill or
a full disk never leaves a truncated file where a good one was.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from kdistill.files import atomic_write
from kdistill.utils import ConfigError

# Damaged bytes make the restricted unpickler fail in many ways (IndexError, KeyError, struct.error,
# UnicodeDecodeError, ...); after UnpicklingError (refused content) every other failure means "damaged".
DAMAGED_FILE_ERRORS: tuple[type[BaseException], ...] = (Exception,)


class CheckpointError(ConfigError):
    """A weights file that cannot be used: unreadable, unsafe, or not matching the model."""


def unpickling_error(path: str | Path, exc: pickle.UnpicklingError, what: str = "") -> CheckpointError:
    """The message for a file ``torch.load(weights_only=True)`` would not unpickle: either it names
    code (a class or function to call, never run here) or it is not pickle data at all."""
    text = str(exc)
    detail = next((line.strip() for line in text.splitlines()[1:] if "Unsupported" in line), text.splitlines()[0])
    if "Unsupported global" in text:
        return CheckpointError(
            f"refused to load {what}{str(path)!r}: it holds objects other than tensors and plain containers, "
            "and unpickling them could run code. Re-save its state_dict, or convert it to safetensors. "
            f"(detail: {detail})"
        )
    return CheckpointError(
        f"refused to load {what}{str(path)!r}: it is not a PyTorch weights file that loads without unpickling "
        f"arbitrary objects (it is damaged, or a pickle that could run code); nothing in it was run ({detail})"
    )


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a safetensors or PyTorch file (a training checkpoint, a shared CIFAR
    teacher ``{"model": ...}``, or a bare state dict), ``module.`` prefixes stripped."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        try:
            state: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({exc})") from exc
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise unpickling_error(path, exc) from exc
        except DAMAGED_FILE_ERRORS as exc:
            raise CheckpointError(
                f"{str(path)!r} is truncated or not a PyTorch weights file; nothing in it was run ({exc!r})"
            ) from exc
    if isinstance(state, Mapping):
        for key in ("model", "state_dict", "student", "net"):
            if key in state and isinstance(state[key], Mapping):
                state = state[key]
                break
    # modules may keep plain extra state (MEAL's selection generator) under "<module>._extra_state"
    if not isinstance(state, Mapping) or not all(
        isinstance(v, Tensor) or str(k).endswith("_extra_state") for k, v in state.items()
    ):
        raise CheckpointError(f"{str(path)!r} does not contain a state dict of tensors")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}


def load_weights(model: nn.Module, path: str | Path, prefix: str = "") -> nn.Module:
    """Load weights into ``model`` with strict key and shape checks.

    ``prefix`` selects a sub-tree (``"student."`` inside a training checkpoint). BatchNorm
    ``num_batches_tracked`` entries missing from old checkpoints are filled with 0. The error lists
    missing, unexpected and shape-mismatched keys.
    """
    state = read_state_dict(path)
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return _load_checked(model, state, path)


def _load_checked(model: nn.Module, state: dict[str, Tensor], path: str | Path) -> nn.Module:
    """``load_state_dict(strict=True)`` with an error that lists every missing, unexpected and mismatched key."""
    own = model.state_dict()
    for key in own:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and isinstance(state[k], Tensor) and isinstance(own[k], Tensor) and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        name = getattr(model, "kdistill_name", type(model).__name__)
        lines = [f"weights in {str(path)!r} do not match model {name!r}:"]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                shown = items[:8] + ([f"... ({len(items) - 8} more)"] if len(items) > 8 else [])
                lines.append(f"  {label} ({len(items)}): " + "; ".join(shown))
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state, strict=True)
    return model


def load_pretrained(model: nn.Module, path: str | Path) -> list[str]:
    """Load pretrained weights (a torchvision or timm state dict saved locally, any class count).

    Every feature weight must match by name and shape. The classifier is the one exception: when the
    file was trained on another class count, the last linear (or convolution) layer's weight and bias,
    whose shapes then differ, keep their fresh initialisation. Returns the names of the entries that were not loaded (empty when all were)."""
    state = read_state_dict(path)
    own = model.state_dict()
    head = _classifier_keys(model)
    replaced = sorted(k for k in head if k in state and k in own and state[k].shape != own[k].shape)
    for key in replaced:
        state[key] = own[key]
    name = getattr(model, "kdistill_name", type(model).__name__)
    try:
        _load_checked(model, state, path)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}\n  (pretrained weights for {name!r} must be that model's own state dict, "
                              "as torchvision or timm save it; only the classifier may differ in size)") from None
    return replaced


def _classifier_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the last linear or 1x1-convolution layer (the classifier a new class count replaces)."""
    last = None
    for mod_name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and mod_name:
            last = mod_name
    if last is None:
        return set()
    return {f"{last}.weight", f"{last}.bias"}


def save_student(model: nn.Module, path: str | Path, card: Mapping[str, Any]) -> Path:
    """Write the student's weights as safetensors and a JSON card (``<path>.json``) beside them."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"kdistill_card": json.dumps(dict(card), default=str)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    card_path = path.with_suffix(".json")
    atomic_write(card_path, lambda tmp: Path(tmp).write_text(json.dumps(dict(card), indent=2, default=str)))
    return path


def read_card(path: str | Path) -> dict[str, Any]:
    """The card stored with a student export (from the JSON beside it, or the safetensors header)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"student export {str(path)!r} does not exist")
    from kdistill.card import check_card, read_card_file

    card_path = path.with_suffix(".json")
    if card_path.is_file():
        return read_card_file(card_path, path)
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({exc})") from exc
    if "kdistill_card" not in meta:
        raise CheckpointError(f"{str(path)!r} has no kdistill card")
    try:
        card = json.loads(meta["kdistill_card"])
    except ValueError as exc:
        raise CheckpointError(f"the card in the header of {str(path)!r} is not valid JSON ({exc})") from exc
    return check_card(card, path)
