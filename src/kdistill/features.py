"""Feature taps: record named module outputs (or inputs) during one forward pass of any model.

A *tap spec* is a small string, so recipes can name features without code:

* ``"layer1"``                      output of module ``layer1``
* ``"layer3.8:input"``              first positional input of ``layer3.8``
* ``"layer3.8.bn2+layer3.8:input"`` sum of several captures (pre-ReLU residual sums)
* suffix operations after ``!``: ``"block1!relu"`` (ReLU of the capture),
  ``"relu!mean"`` (global average over H, W, kept as N×C×1×1)

Captures are cloned at capture time, so later in-place operations in the model (an in-place ReLU
after a tapped module) cannot change them. *Stage presets* give, per model family, the ordered
keys ``stem, stage1 ... stageK, pooled`` with post- or pre-ReLU variants (``stage_taps``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kdistill.utils import ConfigError, unknown_name_error

_OPS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "mean": lambda t: t.mean(dim=(2, 3), keepdim=True),
    "flatten": lambda t: torch.flatten(t, 1),
}


@dataclass(frozen=True)
class _Part:
    module: str
    use_input: bool


@dataclass(frozen=True)
class TapSpec:
    """A parsed tap spec: the sum of captured parts, then element-wise operations."""

    parts: tuple[_Part, ...]
    ops: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> TapSpec:
        body, *ops = text.split("!")
        for op in ops:
            if op not in _OPS:
                raise unknown_name_error("tap operation", op, _OPS)
        parts = []
        for token in body.split("+"):
            name, _, where = token.strip().partition(":")
            if where not in ("", "input", "output"):
                raise ConfigError(f"tap {text!r}: after ':' use 'input' or 'output', got {where!r}")
            parts.append(_Part(name, where == "input"))
        return cls(tuple(parts), tuple(ops))


def available_taps(model: nn.Module) -> list[str]:
    """Names of all modules that can be tapped (``""``, the model itself, excluded)."""
    return [name for name, _ in model.named_modules() if name]


class FeatureRecorder:
    """Context manager that records tap specs during forward passes of ``model``.

    ``detach=True`` (teachers) stores detached copies; otherwise copies keep the autograd graph.
    After a forward, ``recorder.features`` maps each key to its tensor.
    """

    def __init__(self, model: nn.Module, taps: Mapping[str, str], detach: bool = False):
        self.model = model
        self.specs = {key: TapSpec.parse(spec) for key, spec in taps.items()}
        self.detach = detach
        self._captures: dict[tuple[str, bool], Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        modules = dict(model.named_modules())
        for key, spec in self.specs.items():
            for part in spec.parts:
                if part.module not in modules or not part.module:
                    raise unknown_name_error(f"module for tap {key!r}", part.module, available_taps(model))
        self._modules = modules

    def _store(self, name: str, use_input: bool, value: object) -> None:
        if not isinstance(value, Tensor):
            raise TypeError(f"tap {name!r}: module {'input' if use_input else 'output'} is not a tensor")
        value = value.detach() if self.detach else value
        self._captures[(name, use_input)] = value.clone()

    def __enter__(self) -> FeatureRecorder:
        wanted = {(p.module, p.use_input) for spec in self.specs.values() for p in spec.parts}
        for name, use_input in sorted(wanted):
            module = self._modules[name]
            if use_input:  # a pre-hook: an in-place module would overwrite its input before a forward hook
                hook = module.register_forward_pre_hook(lambda m, args, n=name: self._store(n, True, args[0]))
            else:
                hook = module.register_forward_hook(lambda m, args, out, n=name: self._store(n, False, out))
            self._handles.append(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def features(self) -> dict[str, Tensor]:
        """The recorded features of the latest forward pass, keyed as given."""
        return _assemble(self.specs, self._captures)


def _assemble(specs: Mapping[str, TapSpec], captures: Mapping[tuple[str, bool], Tensor]) -> dict[str, Tensor]:
    """Each tap's feature from the captured module outputs/inputs: the sum of its parts, then its ops."""
    out: dict[str, Tensor] = {}
    for key, spec in specs.items():
        missing = [p.module for p in spec.parts if (p.module, p.use_input) not in captures]
        if missing:
            raise RuntimeError(f"tap {key!r}: modules {missing} did not run in the last forward pass")
        value = captures[(spec.parts[0].module, spec.parts[0].use_input)]
        for part in spec.parts[1:]:
            value = value + captures[(part.module, part.use_input)]
        for op in spec.ops:
            value = _OPS[op](value)
        out[key] = value
    return out


class RecordingPass:
    """A network's forward that also returns its tapped features, with hooks registered once.

    ``RecordingPass(model, taps)(x)`` returns ``(logits, features)`` with the features
    ``FeatureRecorder`` records (same tap specs, captures cloned, ``detach`` for teachers). The hooks
    stay on the model for the pass's lifetime but record only while the pass runs, so other calls of
    the model (evaluation, export) are unaffected and keep nothing. Registered once, the hooks are
    traced by ``torch.compile`` into the model's graph; hooks registered on every call (as
    ``FeatureRecorder`` does) break the graph at each registration. Not an ``nn.Module``: it adds no
    parameters or state-dict keys next to the model it wraps.
    """

    def __init__(self, model: nn.Module, taps: Mapping[str, str], detach: bool = False):
        self.model = model
        self.specs = {key: TapSpec.parse(spec) for key, spec in taps.items()}
        self.detach = detach
        self._recording = False
        self._captures: dict[tuple[str, bool], Tensor] = {}
        modules = dict(model.named_modules())
        for key, spec in self.specs.items():
            for part in spec.parts:
                if part.module not in modules or not part.module:
                    raise unknown_name_error(f"module for tap {key!r}", part.module, available_taps(model))
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for name, use_input in sorted({(p.module, p.use_input) for spec in self.specs.values() for p in spec.parts}):
            if use_input:  # a pre-hook: an in-place module would overwrite its input before a forward hook
                handle = modules[name].register_forward_pre_hook(self._pre_hook(name))
            else:
                handle = modules[name].register_forward_hook(self._post_hook(name))
            self._handles.append(handle)

    def _pre_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[object, ...]) -> None:
            self._store(name, True, args[0])
        return hook

    def _post_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[object, ...], out: object) -> None:
            self._store(name, False, out)
        return hook

    def _store(self, name: str, use_input: bool, value: object) -> None:
        if not self._recording:
            return
        if not isinstance(value, Tensor):
            raise TypeError(f"tap {name!r}: module {'input' if use_input else 'output'} is not a tensor")
        value = value.detach() if self.detach else value
        self._captures[(name, use_input)] = value.clone()

    def __call__(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        self._recording = True
        try:
            logits = self.model(x)
        finally:
            self._recording = False
        features = _assemble(self.specs, self._captures)
        self._captures = {}
        return logits, features

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


# --- stage presets ------------------------------------------------------------------------------

StagePreset = Callable[[nn.Module, bool], "OrderedDict[str, str]"]
_PRESETS: list[tuple[Callable[[nn.Module], bool], StagePreset]] = []


def register_stage_preset(match: Callable[[nn.Module], bool]) -> Callable[[StagePreset], StagePreset]:
    """Register ``preset(model, preact) -> {stem, stage1.., pooled: spec}`` for models where ``match``."""

    def deco(fn: StagePreset) -> StagePreset:
        _PRESETS.append((match, fn))
        return fn

    return deco


def model_name(model: nn.Module) -> str:
    """The registry name recorded by ``create_model`` (empty for user models)."""
    return getattr(model, "kdistill_name", "")


def stage_taps(model: nn.Module, preact: bool = False) -> OrderedDict[str, str]:
    """Ordered tap specs ``stem, stage1..stageK, pooled`` of a known model family.

    ``preact=True`` gives the pre-ReLU stage features where the family has them (the teacher
    features of ReviewKD, docs/methods/reviewkd.md).
    """
    for match, preset in _PRESETS:
        if match(model):
            return preset(model, preact)
    raise ConfigError(
        f"no stage preset for model {model_name(model) or type(model).__name__!r}; "
        "give the taps by module name (for example student.taps={stage1: layer1, ..., pooled: avgpool})"
    )


def _last_block(model: nn.Module, layer: str) -> str:
    seq = model.get_submodule(layer)
    return f"{layer}.{len(seq) - 1}"


def _resnet_like_preset(pooled: str, stages: list[str], last_bn: str, shortcut: str) -> StagePreset:
    def preset(model: nn.Module, preact: bool) -> OrderedDict[str, str]:
        taps: OrderedDict[str, str] = OrderedDict(stem="relu")
        for i, layer in enumerate(stages, 1):
            if not preact:
                taps[f"stage{i}"] = layer
                continue
            block = _last_block(model, layer)
            has_proj = dict(model.get_submodule(block).named_children()).get(shortcut) is not None
            skip = f"{block}.{shortcut}" if has_proj else f"{block}:input"
            taps[f"stage{i}"] = f"{block}.{last_bn}+{skip}"
        taps["pooled"] = pooled
        return taps

    return preset


register_stage_preset(lambda m: model_name(m).startswith("cifar.resnet") and model_name(m) != "cifar.resnet50")(
    _resnet_like_preset("avgpool", ["layer1", "layer2", "layer3"], "bn2", "downsample")
)


def _torchvision_resnet_preset(model: nn.Module, preact: bool) -> OrderedDict[str, str]:
    last_bn = "bn3" if hasattr(model.layer1[0], "bn3") else "bn2"
    preset = _resnet_like_preset("avgpool", ["layer1", "layer2", "layer3", "layer4"], last_bn, "downsample")
    return preset(model, preact)


register_stage_preset(
    lambda m: model_name(m).startswith(("torchvision.resnet", "torchvision.resnext", "torchvision.wide_resnet"))
)(_torchvision_resnet_preset)


@torch.no_grad()
def probe_shapes(model: nn.Module, taps: Mapping[str, str], input_size: tuple[int, ...]) -> dict[str, torch.Size]:
    """Dry run: the shape (without batch) of each tap for a batch of two inputs of ``input_size``.

    Runs in eval mode so BatchNorm statistics are untouched; the training mode is restored.
    """
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dummy = torch.zeros(2, *input_size, device=device)
        with FeatureRecorder(model, taps, detach=True) as rec:
            model(dummy)
        return {k: v.shape[1:] for k, v in rec.features.items()}
    finally:
        model.train(was_training)


class TappedModel:
    """A network and the user's named taps: the one place a feature key becomes a tap spec.

    Keys are stage-preset keys (``stem``, ``stage1``..., ``pooled``; ``preact`` picks the pre-ReLU
    variants) or keys named in ``taps`` (``{"last": "layer3"}``), which take precedence over the
    preset. A method asks for keys; the training step records ``tap_specs(keys)`` on this network.
    """

    def __init__(self, model: nn.Module, taps: Mapping[str, str] | None = None):
        self.model = model
        self.taps = dict(taps or {})

    def _preset(self, preact: bool) -> dict[str, str]:
        """The family's stage preset; a model without one is fine when the user named its taps."""
        try:
            return dict(stage_taps(self.model, preact))
        except ConfigError:
            if not self.taps:
                raise
            return {}

    def tap_specs(self, keys: Sequence[str], preact: bool = False, who: str = "") -> dict[str, str]:
        """``{key: tap spec}`` for ``keys``; a ConfigError (prefixed with ``who``) lists the known keys."""
        if not keys:
            return {}
        preset = self._preset(preact) if any(k not in self.taps for k in keys) else {}
        merged = {**preset, **self.taps}
        missing = [k for k in keys if k not in merged]
        if missing:
            raise ConfigError(f"{who}: features {missing} not available; known: {sorted(merged)}")
        return {k: merged[k] for k in keys}

    def stages(self, preact: bool = False) -> list[str]:
        """The ``stageK`` keys this network offers (preset merged with ``taps``), shallow to deep."""
        keys = [k for k in {**self._preset(preact), **self.taps} if k.startswith("stage")]
        return sorted(keys, key=lambda k: (0, int(k[5:])) if k[5:].isdigit() else (1, k))

    def probe(
        self, keys: Sequence[str], preact: bool, input_size: tuple[int, ...], who: str = ""
    ) -> dict[str, torch.Size]:
        """Shapes of ``keys`` from a dry run (``probe_shapes``), to size a method's modules."""
        return probe_shapes(self.model, self.tap_specs(keys, preact, who), input_size)
