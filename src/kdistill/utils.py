"""Small shared helpers: readable errors with close-match suggestions."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """A user-facing configuration problem; the CLI turns it into exit code 2."""


def unknown_name_error(kind: str, name: str, allowed: Iterable[str]) -> ConfigError:
    """Build the error for an unknown ``name`` of ``kind``, listing what is allowed and close matches."""
    allowed = sorted(allowed)
    close = difflib.get_close_matches(name, allowed, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    shown = ", ".join(allowed) if len(allowed) <= 40 else ", ".join(allowed[:40]) + ", ..."
    return ConfigError(f"unknown {kind} {name!r}.{hint} Allowed: {shown}")
