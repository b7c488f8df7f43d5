"""Several optimizers driven as one: one optimizer per network or group of modules.

Online distillation trains several networks (and modules such as fusion heads or decoders) in one
run, each with its own optimizer (SGD for the networks, Adam for FFSD's decoders, another weight
decay for its fusion module). ``GroupedOptimizer`` presents them to a training framework as a
single ``torch.optim.Optimizer``:

* update order: one backward pass of the step's summed losses, then every member optimizer steps
  in the order given. Every cross-network term of the online methods uses the other network's
  outputs as detached targets, so each optimizer sees exactly the gradient of its own network's
  objective, and the order of the steps does not change the result;
* ``param_groups`` is every member's groups in order, so one learning-rate scheduler (e.g.
  ``LambdaLR`` with one factor per group) schedules every optimizer, each from its own base lr;
* ``state_dict`` holds every member's state (checkpointed and resumed together).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class ParamGroup:
    """Parameters trained by one optimizer: a network, or modules of a method.

    ``optimizer`` ``"sgd"`` (the run's momentum and Nesterov flag) or ``"adam"``; ``lr`` and
    ``weight_decay`` default to the run's (``None``); ``lr_scale`` multiplies the lr.
    """

    name: str
    params: list[nn.Parameter] = field(default_factory=list)
    optimizer: str = "sgd"
    lr: float | None = None
    lr_scale: float = 1.0
    weight_decay: float | None = None


OPTIMIZERS = ("sgd", "adam")


def make_optimizer(group: ParamGroup, lr: float, momentum: float, nesterov: bool, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer of one ``ParamGroup``; unset values come from the run's settings."""
    if group.optimizer not in OPTIMIZERS:
        raise ValueError(f"group {group.name!r}: optimizer must be one of {OPTIMIZERS}, got {group.optimizer!r}")
    base = (group.lr if group.lr is not None else lr) * group.lr_scale
    wd = group.weight_decay if group.weight_decay is not None else weight_decay
    if group.optimizer == "adam":
        return torch.optim.Adam(group.params, lr=base, weight_decay=wd)
    return torch.optim.SGD(group.params, lr=base, momentum=momentum, nesterov=nesterov and momentum > 0, weight_decay=wd)


class _MemberStates(MutableMapping):
    """The union of the member optimizers' ``state`` dicts; an entry is read from and written to the
    optimizer that holds the parameter."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]):
        self._owner = {id(p): opt for opt in optimizers for g in opt.param_groups for p in g["params"]}
        self._optimizers = optimizers

    def _state_of(self, key: Any) -> Any:
        if id(key) not in self._owner:
            raise KeyError(key)
        return self._owner[id(key)].state

    def __getitem__(self, key: Any) -> Any:
        return self._state_of(key)[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._state_of(key)[key] = value

    def __delitem__(self, key: Any) -> None:
        del self._state_of(key)[key]

    def __iter__(self) -> Iterator[Any]:
        for opt in self._optimizers:
            yield from list(opt.state)

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._optimizers)


class GroupedOptimizer(torch.optim.Optimizer):
    """Member optimizers stepped in order after one backward pass (see the module docstring)."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer], names: Sequence[str] | None = None):
        # the members own parameters, groups and state: the base constructor (which would register
        # the parameters a second time) is not called; its bookkeeping attributes are set here
        if not optimizers:
            raise ValueError("GroupedOptimizer needs at least one optimizer")
        self.optimizers = list(optimizers)
        self.names = list(names) if names is not None else [f"group{i}" for i in range(len(self.optimizers))]
        seen: set[int] = set()
        for opt in self.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) in seen:
                        raise ValueError("a parameter belongs to two optimizers of a GroupedOptimizer")
                    seen.add(id(p))
        self.defaults = {}
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        """Every member's parameter groups, in member order (the members' own dicts)."""
        return [g for opt in self.optimizers for g in opt.param_groups]

    @param_groups.setter
    def param_groups(self, value: Any) -> None:  # the members own their groups
        pass

    @property  # type: ignore[override]
    def state(self) -> _MemberStates:
        """Every member's per-parameter state: a live view whose writes go to the parameter's owner
        (frameworks move optimizer state between devices by assigning ``state[p]``)."""
        return _MemberStates(self.optimizers)

    @state.setter
    def state(self, value: Any) -> None:
        pass

    def group_of(self, name: str) -> torch.optim.Optimizer:
        """The member optimizer named ``name``."""
        return self.optimizers[self.names.index(name)]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Run ``closure`` (forward and backward) once, then step every member in order."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"names": list(self.names), "optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        if list(state_dict.get("names", [])) != self.names:
            raise ValueError(f"optimizer groups {state_dict.get('names')} do not match this run's {self.names}")
        for opt, state in zip(self.optimizers, state_dict["optimizers"], strict=True):
            opt.load_state_dict(state)

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={type(o).__name__}" for n, o in zip(self.names, self.optimizers, strict=True))
        return f"GroupedOptimizer({inner})"
