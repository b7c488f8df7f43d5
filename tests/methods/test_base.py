"""Typed method options: coerced and checked once (config and ``build_method``), variants as subclasses
with other defaults, run facts through ``RunFacts``, each teacher's own taps by position."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import kdistill
from kdistill.cli import main
from kdistill.config import build_config
from kdistill.methods import MethodOptions, RunFacts, build_method, method_class, method_options, parse_method_options
from kdistill.methods.crd import CRD, CRDKD, CRDKDOptions, CRDOptions
from kdistill.methods.meal import MEAL, MEALV2, MEALOptions, MEALV2Options
from kdistill.step import Distiller
from kdistill.utils import ConfigError


def _pair(size: int = 16):
    torch.manual_seed(0)
    return (kdistill.create_model("cifar.resnet8", num_classes=10),
            kdistill.create_model("cifar.resnet14", num_classes=10))


def test_wrong_type_in_a_recipe_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"method.options.temperature: expected a number, got 'abc'"):
        build_config(None, ["method.name=kd", "method.options.temperature=abc"])
    with pytest.raises(ConfigError, match=r"method.options.blocks\[1\]: expected a string, got \[1\]"):
        build_config(None, ["method.name=meal_v1", "method.options.blocks=[logits, [1]]"])
    with pytest.raises(ConfigError, match=r"method.options.learn_variance: expected true or false, got 'yes please'"):
        build_config(None, ["method.name=vid", "method.options.learn_variance=yes please"])
    # ranges of single options are checked by the same step, before anything is built
    with pytest.raises(ConfigError, match="warmup_epoch_base must be 0 .official. or 1"):
        build_config(None, ["method.name=reviewkd", "method.options.warmup_epoch_base=3"])


def test_wrong_type_exits_2_from_the_command(capsys: pytest.CaptureFixture, tmp_path) -> None:
    code = main(["distill", "teacher.model=cifar.resnet8", "method.name=kd", "method.options.temperature=abc",
                 f"output={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "method.options.temperature: expected a number, got 'abc'" in err
    assert not (tmp_path / "run").exists()


def test_build_method_uses_the_same_check() -> None:
    s, t = _pair()
    with pytest.raises(ConfigError, match=r"^temperature: expected a number, got 'abc'"):
        build_method("kd", student=s, teachers=[t], temperature="abc")
    with pytest.raises(ConfigError, match=r"unknown option of method 'kd' 'temprature'"):
        build_method("kd", student=s, teachers=[t], temprature=2.0)
    options = parse_method_options("kd", {"temperature": 2})
    assert options.temperature == 2.0 and isinstance(options.temperature, float)
    assert build_method("kd", student=s, teachers=[t], options=options).temperature == 2.0
    with pytest.raises(ConfigError, match="either as an Options instance or as keywords"):
        build_method("kd", student=s, teachers=[t], options=options, kd_weight=1.0)
    with pytest.raises(TypeError, match="kd takes KDOptions, got DKDOptions"):
        method_class("kd")(s, [t], parse_method_options("dkd", {}))


def test_variants_are_subclasses_with_other_defaults() -> None:
    assert issubclass(CRDKD, CRD) and issubclass(CRDKDOptions, CRDOptions)
    assert issubclass(MEALV2, MEAL) and issubclass(MEALV2Options, MEALOptions)
    crd, crd_kd = method_options("crd"), method_options("crd_kd")
    assert {k for k in crd if crd[k] != crd_kd[k]} == {"kd_weight"} and (crd["kd_weight"], crd_kd["kd_weight"]) == (0, 1)
    v1, v2 = method_options("meal_v1"), method_options("meal_v2")
    assert {k for k in v1 if v1[k] != v2[k]} == {"teacher_selection", "disc_reduction", "d_lr", "d_weight_decay"}
    # one constructor for every method: no copied or rewritten signatures
    for name in kdistill.list_methods():
        cls = method_class(name)
        assert cls.__init__ is kdistill.methods.Method.__init__, name
        assert dataclasses.is_dataclass(cls.Options) and issubclass(cls.Options, MethodOptions), name
        assert "__signature__" not in vars(cls.__init__), name
    assert list(inspect.signature(MEALV2.__init__).parameters) == ["self", "student", "teachers", "options", "facts"]


def test_run_facts_reach_the_method() -> None:
    s, t = _pair()
    crd = build_method("crd", student=s, teachers=[t], facts=RunFacts(input_size=(3, 16, 16), num_samples=50),
                       num_negatives=8)
    assert crd.criterion.memory.num_data == 50 and crd.input_size == (3, 16, 16)
    # an explicit option wins over the run's number
    crd = build_method("crd", student=s, teachers=[t], facts=RunFacts(num_samples=50), num_samples=30, num_negatives=8)
    assert crd.criterion.memory.num_data == 30
    with pytest.raises(ConfigError, match="needs num_samples"):
        build_method("crd", student=s, teachers=[t])


def test_each_teacher_gets_its_own_taps_even_when_the_same_module_is_given_twice() -> None:
    """Taps are resolved by position: the same network twice with two different named taps keeps both
    (a lookup by identity gave both teachers the second one's taps)."""
    s, t = _pair()
    m = build_method("meal_v1", student=s, teachers=[t, t], blocks=["last", "logits"], align="gap_linear",
                     student_taps={"last": "layer3"}, teacher_taps=[{"last": "layer3"}, {"last": "layer3.1"}])
    assert (m.teacher_taps(0)["last"], m.teacher_taps(1)["last"]) == ("layer3", "layer3.1")
    d = Distiller(s, [t, t], m)
    assert [taps["last"] for taps in d.teacher_taps] == ["layer3", "layer3.1"]
    with pytest.raises(ConfigError, match="built for 2 teachers, the distiller has 1"):
        Distiller(s, [t], m)


@pytest.mark.parametrize("method", ["crd", "hkd", "mcl_okd"])
@pytest.mark.parametrize(("option", "value", "message"), [
    ("num_samples", 1, "{m}: num_samples must be >= 2, got 1"),
    ("num_negatives", 0, "{m}: num_negatives must be >= 1, got 0"),
    ("temperature", 0.0, "temperature must be > 0, got 0.0"),
    ("momentum", 1.0, r"{m}: momentum must be in \[0, 1\), got 1.0"),
    ("feat_dim", 0, "{m}: feat_dim must be >= 1, got 0"),
    ("sampling", "slow", "sampling"),
    ("kd_temperature", -1.0, "kd_temperature must be > 0, got -1.0"),
])
def test_memory_bank_methods_check_their_shared_options_alike(method: str, option: str, value: object,
                                                              message: str) -> None:
    assert parse_method_options(method, {}).sampling in ("fast", "exact")  # the defaults pass
    with pytest.raises(ConfigError, match=message.format(m=method)):
        parse_method_options(method, {option: value})


@pytest.mark.parametrize(("method", "labels", "expected"), [
    ("crd", None, 9),                                   # every other sample of 10
    ("crd", [0, 0, 0, 0, 1, 1, 2, 2, 2, 3], 9),         # CRD's cap ignores the classes
    ("hkd", [0, 0, 0, 0, 1, 1, 2, 2, 2, 3], 6),         # outside the largest class (4 samples)
    ("mcl_okd", [0, 0, 0, 0, 1, 1, 2, 2, 2, 3], 6),
    ("hkd", None, 9),                                   # labels unknown: every other sample
])
def test_memory_bank_negatives_are_capped_at_the_candidates(method: str, labels: list[int] | None,
                                                             expected: int) -> None:
    facts = RunFacts(input_size=(3, 16, 16), num_samples=10,
                     train_targets=None if labels is None else torch.tensor(labels))
    if method == "mcl_okd":
        student = kdistill.create_model("online.branch_resnet", num_classes=4, depth=8, num_branches=2)
        teachers = []
    else:
        student = kdistill.create_model("cifar.resnet8", num_classes=4)
        teachers = [kdistill.create_model("cifar.resnet8", num_classes=4)]
    with pytest.warns(UserWarning, match=f"{method}: num_negatives=50 exceeds the {expected} candidates; using {expected}"):
        m = build_method(method, student=student, teachers=teachers, facts=facts, num_negatives=50)
    assert m.bank_rows_and_negatives(other_classes=method != "crd") == (10, expected)
    with pytest.raises(ConfigError, match="needs num_samples"):
        m.facts = RunFacts(input_size=(3, 16, 16))
        m.bank_rows_and_negatives(other_classes=False)
