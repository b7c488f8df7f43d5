"""Distillation methods, one file each; importing this package registers them all."""

import importlib
import pkgutil

from kdistill.methods.base import (
    Batch,
    Method,
    MethodOptions,
    ModelOutput,
    RunFacts,
    StepInfo,
    build_method,
    list_methods,
    method_class,
    method_options,
    parse_method_options,
    register_method,
)

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "Batch",
    "Method",
    "MethodOptions",
    "ModelOutput",
    "RunFacts",
    "StepInfo",
    "build_method",
    "list_methods",
    "method_class",
    "method_options",
    "parse_method_options",
    "register_method",
]
