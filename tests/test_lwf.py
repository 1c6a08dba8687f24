"""LwF: the distillation maths against hand computations, and the method's teacher, masking and state."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import mlp, step
from synapse import catalog
from synapse.distillation import LwF
from synapse.functional import soft_distillation_grad, soft_distillation_loss

OLD = torch.tensor([True] * 5 + [False] * 5)  # classes 0..4 are task 1's


def batch(classes, seed, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.tensor(classes)[torch.arange(n) % len(classes)]


def into_second_task(alpha=1.0, temperature=2.0, **options):
    """``(model, syn, opt, teacher)``: 3 steps on classes 0..4, the task's end, and one step on classes
    5..9, so that the model is no longer its teacher (at the first step after a task end the two agree,
    and the distillation gradient is zero). ``teacher`` is a copy of the model made at the task's end."""
    torch.manual_seed(0)
    model = mlp()
    syn = LwF(model, alpha, temperature, **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for seed in range(3):
        step(model, syn, *batch(range(5), seed), opt)
    syn.end_task()
    teacher = copy.deepcopy(model).eval()
    step(model, syn, *batch(range(5, 10), 20), opt)
    return model, syn, opt, teacher


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


# ---------------------------------------------------------------- the pure function, by hand
S = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 5.0]])  # student logits
TEACHER = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 7.0]])
MASK = torch.tensor([True, True, False])  # column 2 is a new class: left out of both softmaxes


def hand_values():
    """At T = 2, over columns 0 and 1 only: (q, p) per row, the loss, and the gradient (weight 1)."""
    e, r = math.e, math.exp(0.5)
    q = [[r / (r + 1), 1 / (r + 1)], [0.5, 0.5]]  # softmax of S/2 = [.5, 0] and [0, 0]
    p = [[e / (e + 1), 1 / (e + 1)], [1 / (1 + r), r / (1 + r)]]  # softmax of TEACHER/2 = [1, 0] and [0, .5]
    row0 = -(p[0][0] * math.log(q[0][0]) + p[0][1] * math.log(q[0][1]))
    row1 = math.log(2)  # q uniform over 2 classes: -sum p log 1/2
    loss = (row0 + row1) / 2
    grad = [[(q[b][j] - p[b][j]) / (2 * 2) for j in range(2)] + [0.0] for b in range(2)]  # (q - p) / (B T)
    return loss, torch.tensor(grad)


def test_soft_distillation_loss_by_hand():
    loss, _ = hand_values()
    assert soft_distillation_loss(S, TEACHER, 2.0, MASK).item() == pytest.approx(loss, rel=1e-6)
    additive = torch.tensor([0.0, 0.0, float("-inf")])  # the same mask in its additive form
    assert soft_distillation_loss(S, TEACHER, 2.0, additive).item() == pytest.approx(loss, rel=1e-6)
    # A student with an extra column (its head grew): only the teacher's columns are compared.
    wider = torch.cat([S, torch.tensor([[9.0], [-3.0]])], dim=1)
    assert soft_distillation_loss(wider, TEACHER, 2.0, MASK).item() == pytest.approx(loss, rel=1e-6)
    # Without a mask all three columns count: row 1 at T = 1 is plain cross-entropy with soft targets.
    p, log_q = torch.softmax(TEACHER[1], 0), torch.log_softmax(S[1], 0)
    plain = soft_distillation_loss(S[1:], TEACHER[1:], 1.0)
    assert plain.item() == pytest.approx(-(p * log_q).sum().item(), rel=1e-6)


def test_soft_distillation_grad_by_hand_and_by_autograd():
    _, grad = hand_values()
    assert torch.allclose(soft_distillation_grad(S, TEACHER, 2.0, MASK), grad, atol=1e-7)
    assert torch.allclose(soft_distillation_grad(S, TEACHER, 2.0, MASK, weight=0.3), 0.3 * grad, atol=1e-7)
    wider = torch.cat([S, torch.tensor([[9.0], [-3.0]])], dim=1)
    assert torch.equal(soft_distillation_grad(wider, TEACHER, 2.0, MASK)[:, 3], torch.zeros(2))

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([True, False, True, True, False])
    (0.7 * soft_distillation_loss(logits, teacher, 3.0, mask)).backward()
    closed = soft_distillation_grad(logits, teacher, 3.0, mask, weight=0.7)
    assert closed.dtype == torch.float64 and torch.allclose(closed, logits.grad, atol=1e-12)
    assert torch.equal(closed[:, [1, 4, 5]], torch.zeros(4, 3))


def test_soft_distillation_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shrink"):
        soft_distillation_loss(S[:, :2], TEACHER)
    with pytest.raises(ValueError, match="class_mask"):
        soft_distillation_grad(S, TEACHER, 2.0, MASK[:2])


# ---------------------------------------------------------------- the method
def test_before_any_task_end_backward_is_plain_backward():
    torch.manual_seed(0)
    model = mlp()
    reference = copy.deepcopy(model)
    syn = LwF(model)
    for seed in range(2):
        x, y = batch(range(10), seed)
        model.zero_grad()
        reference.zero_grad()
        step(model, syn, x, y)
        F.cross_entropy(reference(x), y).backward()
        for a, b in zip(model.parameters(), reference.parameters()):
            assert torch.equal(a.grad, b.grad)
    assert syn.teacher is None


def test_gradient_is_that_of_loss_plus_alpha_times_the_pure_function():
    model, syn, _, teacher = into_second_task(alpha=0.7, temperature=3.0)
    reference = copy.deepcopy(model)
    assert torch.equal(syn.old_classes, OLD)
    x, y = batch(range(5, 10), seed=10)  # the second task's classes
    model.zero_grad()
    step(model, syn, x, y)
    out = reference(x)
    total = F.cross_entropy(out, y) + 0.7 * soft_distillation_loss(out, teacher(x), 3.0, OLD)
    total.backward()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(a.grad, torch.autograd.grad(F.cross_entropy(reference(x), y), b)[0])  # it matters


def test_new_classes_get_no_distillation_gradient():
    model, syn, _, _ = into_second_task()
    x, _ = batch(range(5), seed=10)
    y = torch.arange(8) % 10
    model.zero_grad()
    out = model(x)
    syn.backward(0.0 * out.sum(), y, input=x)  # the user's loss adds nothing: the gradient is distillation's
    head = model[-1]
    assert torch.equal(head.weight.grad[5:], torch.zeros(5, 100)) and torch.equal(head.bias.grad[5:], torch.zeros(5))
    assert (head.bias.grad[:5] != 0).all()
    # Softmax gradients sum to zero over the distilled classes.
    assert head.bias.grad[:5].sum().abs() < 1e-6


def test_a_grown_head_is_compared_on_the_teachers_columns():
    model, syn, _, _ = into_second_task()
    old_head = model[-1]
    model[-1] = nn.Linear(100, 12)  # two new classes
    with torch.no_grad():
        model[-1].weight[:10] = old_head.weight
        model[-1].bias[:10] = old_head.bias
    x, _ = batch(range(5), seed=10)
    y = torch.tensor([10, 11] * 4)
    out = model(x)
    syn.backward(0.0 * out.sum(), y, input=x)
    assert torch.equal(model[-1].bias.grad[5:], torch.zeros(7)) and (model[-1].bias.grad[:5] != 0).all()
    assert syn.seen_classes.tolist() == [True] * 12  # the seen flags grew with the head
    syn.end_task()  # the new teacher has the wider head
    assert syn.teacher[-1].out_features == 12 and syn.old_classes.shape == (12,)


def test_the_teacher_is_frozen_and_hook_free():
    model, syn, opt, _ = into_second_task()
    teacher = syn.teacher
    snapshot = copy.deepcopy(teacher.state_dict())
    assert teacher is not model and not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for seed in range(3):
        step(model, syn, *batch(range(5, 10), seed), opt)
    assert all(torch.equal(v, snapshot[k]) for k, v in teacher.state_dict().items())
    assert not torch.equal(model[-1].weight, teacher[-1].weight)  # the model moved on; the teacher did not
    # A training-mode forward of the copy, with grad enabled, is not seen by the model's capture.
    teacher.train()
    teacher(batch(range(5), 0)[0])
    assert syn._forward.outputs is None
    teacher.eval()


def test_bf16_teacher_gives_nearly_the_same_gradient():
    results = []
    for dtype in (None, torch.bfloat16):
        model, syn, _, _ = into_second_task(teacher_dtype=dtype)
        model.zero_grad()
        x, _ = batch(range(5), seed=10)
        out = model(x)
        syn.backward(0.0 * out.sum(), torch.arange(8) % 10, input=x)
        results.append(model[-1].bias.grad.clone())
    assert torch.allclose(results[0], results[1], atol=2e-3) and not torch.equal(*results)


def test_grad_scaler_scales_the_distillation_term_too():
    params = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=10**6)):
        model, syn, opt, _ = into_second_task(scaler=scaler)
        for seed in range(3):
            step(model, syn, *batch(range(5, 10), seed), opt)
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(params[0], params[1], rtol=1e-6, atol=1e-7)


def test_a_teacher_narrower_than_the_model_loads():
    # Resuming after the head grew: the loader rebuilds the teacher as it was when the task ended.
    _, syn, _, _ = into_second_task()
    state = syn.state_dict()
    wider = mlp(num_classes=12)
    syn2 = LwF(wider)
    syn2.load_state_dict(state)
    assert syn2.teacher[-1].weight.shape == (10, 100)
    x = batch(range(5), 0)[0]
    assert torch.equal(syn2.teacher(x), syn.teacher(x))
    out = wider(x)
    syn2.backward(out.sum() * 0.0, torch.arange(8) % 12, input=x)  # distils over the 10 old columns
    assert torch.equal(wider[-1].bias.grad[5:], torch.zeros(7))


@pytest.mark.parametrize(
    "kwargs",
    [
        # alpha's and temperature's ranges are the contract's (tests/test_contract.py): they are in the catalog
        {"teacher_dtype": torch.float32},
        {"teacher_dtype": "bfloat16"},
        {"scaler": "scaler"},
    ],
)
def test_bad_constructor_arguments_are_rejected_before_hooking_the_model(kwargs):
    model = mlp()
    with pytest.raises((TypeError, ValueError)) as info:
        LwF(model, **kwargs)
    assert next(iter(kwargs)) in str(info.value)
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_rejected_backward_and_load_change_nothing():
    model, syn, _, _ = into_second_task()
    before = copy.deepcopy(syn.state_dict())

    def unchanged():
        after = syn.state_dict()
        assert after.keys() == before.keys() and after["num_steps"] == before["num_steps"]
        for key in ("seen_classes", "old_classes"):
            assert torch.equal(after["state"][key], before["state"][key])
        assert all(torch.equal(v, before["state"]["teacher"][k]) for k, v in after["state"]["teacher"].items())

    x, y = batch(range(5, 10), 10)
    model.zero_grad()
    with pytest.raises(ValueError, match="not parameters"):  # the teacher could not be called with it
        syn.backward(F.cross_entropy(model(x), y), y, inputs=x)
    unchanged()
    narrow = mlp(num_classes=8)  # a head that shrank: the model now outputs fewer columns than it did
    syn._forward.outputs = narrow(x)
    with pytest.raises(ValueError, match="shrink"):
        syn.backward(F.cross_entropy(syn._forward.outputs, y % 8), y % 8, input=x)
    unchanged()
    assert all(p.grad is None for p in model.parameters())
    for bad in (
        {**before, "state": {"seen_classes": None}},
        {**before, "state": {**before["state"], "old_classes": None}},
        {**before, "state": {**before["state"], "teacher": {"0.weight": torch.zeros(1)}}},
        {**before, "state": {**before["state"], "old_classes": torch.zeros(10)}},
    ):
        with pytest.raises(ValueError):
            syn.load_state_dict(bad)
        unchanged()
    step(model, syn, x, y)  # still trains


def test_registered_in_the_catalog():
    spec = catalog.get("lwf")
    assert spec.cls is LwF and spec.family == "distillation" and spec.defaults() == {"alpha": 1.0, "temperature": 2.0}
    syn = spec.create(mlp(), buffer_size=40, buffer_sample_size=8)
    assert isinstance(syn, LwF) and syn.alpha == 1.0 and syn.temperature == 2.0


def test_lwf_keeps_the_old_classes_outputs_closer_to_the_teacher():
    # Two tasks of separable 20-d clusters. After the second, the old-class distribution on held-out inputs
    # of the first task has drifted from the teacher's (KL at T = 2) far less with distillation than
    # without (alpha = 0: fine-tuning). Measured: 0.028 without, 0.007 with.
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 20, generator=g) * 2

    def task(classes, n=64):
        y = torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=g)]
        return centres[y] + torch.randn(n, 20, generator=g), y

    first, second, probe = task(range(5)), task(range(5, 10)), task(range(5), 256)[0]
    drift = []
    for alpha in (0.0, 1.0):
        torch.manual_seed(0)
        model = mlp(in_features=20)
        syn = LwF(model, alpha=alpha)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for x, y in (first, second):
            if y is second[1]:
                syn.end_task()
            for i in range(40):
                rows = slice(i % 8 * 8, i % 8 * 8 + 8)
                step(model, syn, x[rows], y[rows], opt)
        with torch.no_grad():
            student, teacher = model(probe), syn.teacher(probe)
            kl = soft_distillation_loss(student, teacher, 2.0, OLD) - soft_distillation_loss(teacher, teacher, 2.0, OLD)
        drift.append(kl.item())
    assert drift[1] < 0.5 * drift[0], drift
