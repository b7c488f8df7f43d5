"""The training step (kdistill.step): the teacher pass options (bf16 autocast, channels_last), teacher
sources (live, fixed, cache), the method's teacher selection asked once per step, the loss sum."""

from __future__ import annotations

import pytest
import torch
from conftest import STEP_CLASSES as NUM_CLASSES
from conftest import make_augment, make_data, make_distiller

import kdistill
from kdistill.methods import Batch, ModelOutput, StepInfo, build_method
from kdistill.step import Distiller, FixedTeachers, OwnOptimizerStep, classifier_head, sum_losses, train_step


def test_teacher_bf16_autocast_path_and_agreement() -> None:
    d = make_distiller()
    x = make_augment()(make_data(32, seed=5).images, train=False)
    dtypes: list[torch.dtype] = []
    hook = d.teachers[0].conv1.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    head = classifier_head(d.teachers[0])
    head_io: list[tuple[torch.dtype, torch.dtype]] = []
    head_hook = head.register_forward_hook(lambda m, i, o: head_io.append((i[0].dtype, o.dtype)))
    ref = d.teacher_outputs(x, [0])[0].logits
    d.configure_teachers("bf16")
    low = d.teacher_outputs(x, [0])[0].logits
    hook.remove()
    head_hook.remove()
    assert dtypes == [torch.float32, torch.bfloat16]
    # the classifier receives bf16 pooled features but computes in float32 under bf16 autocast
    assert head_io == [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)]
    feats = torch.randn(4, head.in_features).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = head(feats)
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, torch.nn.functional.linear(feats.float(), head.weight, head.bias))
    d.configure_teachers("32")
    assert "forward" not in head.__dict__ and torch.equal(d.teacher_outputs(x, [0])[0].logits, ref)
    d.configure_teachers("bf16")
    assert low.dtype == torch.float32 and ref.dtype == torch.float32  # losses always see float32
    assert not torch.equal(low, ref)
    agreement = (low.argmax(1) == ref.argmax(1)).float().mean()
    assert agreement >= 0.9, f"bf16 top-1 agreement {agreement:.2f}"
    assert (low - ref).abs().max() < 0.1 * ref.std()
    with pytest.raises(kdistill.utils.ConfigError, match="'32', 'bf16' or '16'"):
        d.configure_teachers("fp8")


def test_channels_last_teacher_outputs_equal_the_default() -> None:
    d = make_distiller("at")  # with feature taps too
    x = make_augment()(make_data(8, seed=2).images, train=False)
    ref = d.teacher_forward(0, x)
    formats: list[bool] = []
    hook = d.teachers[0].layer1.register_forward_hook(lambda m, i, o: formats.append(o.is_contiguous(memory_format=torch.channels_last)))
    d.configure_teachers("32", channels_last=True)
    assert d.teachers[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    out = d.teacher_forward(0, x)
    hook.remove()
    assert formats == [True]
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    assert out.features.keys() == ref.features.keys()
    for k in ref.features:
        torch.testing.assert_close(out.features[k], ref.features[k], atol=1e-5, rtol=1e-5)


def _pool(n: int = 3):
    torch.manual_seed(0)
    student = kdistill.create_model("cifar.resnet8", num_classes=NUM_CLASSES)
    teachers = [kdistill.create_model("cifar.resnet8", num_classes=NUM_CLASSES) for _ in range(n)]
    return student, teachers


def test_the_step_asks_the_method_once_and_takes_teacher_outputs_from_the_source() -> None:
    """MEAL v1 draws one teacher per batch: the source receives exactly that selection and no teacher
    network runs when the source supplies the outputs."""
    student, teachers = _pool()
    method = build_method("meal_v1", student=student, teachers=teachers, input_size=(3, 16, 16), seed=4)
    d = Distiller(student, teachers, method).train()
    calls = [0] * 3
    for i, t in enumerate(teachers):
        t.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    seen: list[list[int]] = []
    fixed = torch.randn(4, NUM_CLASSES)

    def source(batch: Batch, selected):
        seen.append(list(selected))
        return batch, [ModelOutput(fixed.clone()) for _ in selected]

    batch = Batch(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
    for step in range(5):
        d.forward_train(batch, StepInfo(step=step), teachers=source)
    assert calls == [0, 0, 0]
    assert [len(s) for s in seen] == [1] * 5 and method.selection_counts.tolist() == torch.bincount(
        torch.tensor([s[0] for s in seen]), minlength=3).tolist()
    # the live pass (default) runs exactly the selected teacher
    d.forward_train(batch, StepInfo())
    assert sum(calls) == 1 and calls.index(1) == method._selected[0]


def test_fixed_outputs_give_the_same_losses_as_the_live_pass() -> None:
    d = make_distiller("kd")
    x = make_augment()(make_data(8).images, train=False)
    batch = Batch(x, torch.arange(8) % NUM_CLASSES)
    outputs = d.teacher_outputs(x, [0])
    assert not outputs[0].logits.is_inference()  # may enter autograd graphs
    torch.manual_seed(0)
    _, live = d.forward_train(batch, StepInfo())
    torch.manual_seed(0)
    _, fixed = d.forward_train(batch, StepInfo(), teachers=FixedTeachers(outputs))
    assert live.keys() == fixed.keys() == {"ce", "kd"}
    for k in live:
        torch.testing.assert_close(live[k], fixed[k], rtol=0, atol=0)


def test_train_step_sums_the_terms_and_updates_only_the_student() -> None:
    d = make_distiller("kd")
    x = make_augment()(make_data(8).images, train=False)
    batch = Batch(x, torch.arange(8) % NUM_CLASSES)
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.1)
    teacher_before = [p.clone() for p in d.teachers[0].parameters()]
    student_before = [p.clone() for p in d.student.parameters()]
    terms = train_step(d, batch, StepInfo(), opt, OwnOptimizerStep(d.method))
    assert set(terms) == {"ce", "kd"}
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, d.teachers[0].parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(student_before, d.student.parameters(), strict=True))
    total = sum_losses({"a": torch.tensor(1.5, dtype=torch.bfloat16), "b": torch.tensor(2.25)})
    assert total.dtype == torch.float32 and total.item() == 3.75
