"""What the online methods share: the cohort of networks they train and one optimizer group each."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from kdistill.features import TappedModel
from kdistill.models.cohort import Cohort
from kdistill.optim import ParamGroup
from kdistill.utils import ConfigError


def require_cohort(name: str, student: TappedModel, min_members: int = 2, trunk: bool | None = None) -> Cohort:
    """The run's student as a ``Cohort`` of at least ``min_members`` networks; a ConfigError says how
    to ask for one (``trunk`` True/False: the cohort must / must not share a trunk)."""
    model = student.model
    if not isinstance(model, Cohort):
        raise ConfigError(
            f"{name} trains several networks together: the student must be a cohort model, e.g. "
            "student.model=online.peers with student.kwargs.networks=[cifar.resnet20, cifar.resnet20] "
            f"(got {getattr(model, 'kdistill_name', type(model).__name__)!r})"
        )
    if len(model.members) < min_members:
        raise ConfigError(f"{name} needs at least {min_members} networks in the cohort, got {len(model.members)}")
    if trunk is True and model.trunk is None:
        raise ConfigError(f"{name} needs networks with a shared trunk (online.oekd_resnet or online.branch_resnet)")
    if trunk is False and model.trunk is not None:
        raise ConfigError(f"{name} needs independent networks (online.peers), not a cohort with a shared trunk")
    return model


def params(*modules: nn.Module | None) -> list[nn.Parameter]:
    """Trainable parameters of ``modules`` (``None`` entries skipped), each once."""
    seen: dict[int, nn.Parameter] = {}
    for module in modules:
        if module is not None:
            for p in module.parameters():
                if p.requires_grad:
                    seen.setdefault(id(p), p)
    return list(seen.values())


def member_groups(
    cohort: Cohort, extra: Sequence[Iterable[nn.Module]] | None = None, **settings: object
) -> list[ParamGroup]:
    """One ``ParamGroup`` per member named after it (with ``extra[i]``, modules trained with member
    ``i``), preceded by a ``trunk`` group when the cohort shares one; ``settings`` go to every group."""
    groups = []
    if cohort.trunk is not None:
        groups.append(ParamGroup("trunk", params(cohort.trunk), **settings))  # type: ignore[arg-type]
    for i, (name, member) in enumerate(zip(cohort.names, cohort.members, strict=True)):
        mods = list(extra[i]) if extra is not None else []
        groups.append(ParamGroup(name, params(member, *mods), **settings))  # type: ignore[arg-type]
    return groups
