"""Model zoo: the registry and every family module (imported so their decorators run)."""

import importlib
import pkgutil

from kdistill.models.registry import create_model, is_known_model, list_models, register_model

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in {"registry"}:
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["create_model", "is_known_model", "list_models", "register_model"]
