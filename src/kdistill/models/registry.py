"""Models by name: ``create_model("cifar.resnet20", num_classes=100)``.

A registry filled by the ``@register_model`` decorator next to each definition (timm style), plus
two open namespaces that resolve at call time: ``torchvision.<name>`` and ``timm.<name>``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from kdistill.utils import ConfigError, unknown_name_error

ModelFactory = Callable[..., nn.Module]
_MODELS: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register a model factory under ``name`` (for example ``"cifar.resnet20"``)."""

    def deco(fn: ModelFactory) -> ModelFactory:
        if name in _MODELS:
            raise RuntimeError(f"model {name!r} registered twice")
        _MODELS[name] = fn
        return fn

    return deco


def list_models(prefix: str = "") -> list[str]:
    """Registered model names (the built-in zoo), optionally filtered by prefix."""
    return sorted(n for n in _MODELS if n.startswith(prefix))


def is_known_model(name: str) -> bool:
    """True if ``name`` is registered or names a namespace resolved at call time."""
    return name in _MODELS or name.startswith(("torchvision.", "timm."))


def _torchvision_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise unknown_name_error("torchvision model", name, available)
    return torchvision.models.get_model(name, num_classes=num_classes, **kwargs)


def _timm_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    try:
        import timm
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError("timm models need the optional dependency: pip install 'kdistill[timm]'") from exc
    if not timm.is_model(name):
        raise unknown_name_error("timm model", name, timm.list_models())
    return timm.create_model(name, num_classes=num_classes, **kwargs)


def create_model(name: str, num_classes: int = 100, **kwargs: Any) -> nn.Module:
    """Build a model by name; ``model.kdistill_name`` records the name for feature presets."""
    if name.startswith("torchvision."):
        model = _torchvision_model(name.split(".", 1)[1], num_classes, **kwargs)
    elif name.startswith("timm."):
        model = _timm_model(name.split(".", 1)[1], num_classes, **kwargs)
    elif name in _MODELS:
        model = _MODELS[name](num_classes=num_classes, **kwargs)
    else:
        raise unknown_name_error("model", name, [*_MODELS, "torchvision.<name>", "timm.<name>"])
    model.kdistill_name = name
    return model
