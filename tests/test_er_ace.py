"""ER-ACE: the asymmetric cross-entropy against hand computations, and the method's gradient against an
explicit recomputation on the same replay samples."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import batches, mlp, step
from synapse import catalog
from synapse.functional import ace_class_mask, asymmetric_cross_entropy
from synapse.rehearsal import ER, ERACE


# ---------------------------------------------------------------------------------------- the pure functions
def test_asymmetric_cross_entropy_matches_a_hand_computation():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 1.0, -1.0, 2.0]], requires_grad=True)
    targets = torch.tensor([1, 3])
    present = torch.tensor([False, True, False, True])  # classes {1, 3}
    loss = asymmetric_cross_entropy(logits, targets, present)
    # Row 0: softmax over (2, 4), target 2: -log(e^2 / (e^2 + e^4)) = 2 + log(1 + e^-2).
    # Row 1: softmax over (1, 2), target 2: -log(e^2 / (e^1 + e^2)) = log(1 + e^-1).
    expected = (2 + math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    # d/dz = (softmax over {1, 3} - one-hot) / 2; the absent columns get nothing.
    p = 1 / (1 + math.exp(2))  # row 0, class 1
    q = 1 / (1 + math.exp(1))  # row 1, class 1
    hand = torch.tensor([[0.0, p - 1, 0.0, 1 - p], [0.0, q, 0.0, -q]]) / 2
    assert torch.allclose(logits.grad, hand, atol=1e-6)
    # All columns allowed: the plain cross-entropy.
    everything = torch.ones(4, dtype=torch.bool)
    assert torch.allclose(asymmetric_cross_entropy(logits, targets, everything), F.cross_entropy(logits, targets))


def test_ace_class_mask_is_the_present_classes_and_the_unseen_ones():
    targets = torch.tensor([1, 2, 1])
    # Nothing seen before: the present classes {1, 2} and everything from 2 up.
    assert ace_class_mask(targets, 6).tolist() == [False, True, True, True, True, True]
    # Label 4 seen earlier: {1, 2} and {4, 5}; 0 and 3 (seen, absent) are excluded.
    assert ace_class_mask(targets, 6, torch.tensor(4)).tolist() == [False, True, True, False, True, True]
    # With this task's classes {0, 1} added.
    task = torch.tensor([True, True, False, False, False, False])
    assert ace_class_mask(targets, 6, torch.tensor(4), task).tolist() == [True, True, True, False, True, True]


# ---------------------------------------------------------------------------------------- the method
def test_first_step_masks_the_absent_seen_classes():
    torch.manual_seed(0)
    model = mlp()
    syn = ERACE(model, 40, 8)
    x = torch.randn(8, 1, 28, 28)
    y = torch.tensor([2, 5, 2, 5, 5, 2, 2, 5])  # C = {2, 5} ∪ {5..9}: classes 0, 1, 3, 4 are excluded
    step(model, syn, x, y)
    bias_grad = model[-1].bias.grad
    assert torch.all(bias_grad[[0, 1, 3, 4]] == 0)
    assert torch.all(bias_grad[[2, 5, 6, 7, 8, 9]] != 0)


@pytest.mark.parametrize("mask", ["batch", "task"])
@pytest.mark.parametrize("fused", [True, False])
def test_gradient_is_ace_on_the_batch_plus_alpha_ce_on_the_replayed_samples(mask, fused):
    torch.manual_seed(0)
    model = mlp()
    alpha = 0.7
    syn = ERACE(model, 30, 6, alpha=alpha, mask=mask, fused=fused)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    # The last batch lacks class 6, which its task has shown: the two masks differ there.
    first, second = batches(4, [0, 1, 2, 3, 4]), batches(2, [5, 6, 7], seed=1) + batches(1, [5, 7], seed=2)
    for x, y in first:
        step(model, syn, x, y, opt)
    syn.end_task()
    for x, y in second[:2]:
        step(model, syn, x, y, opt)

    snapshot = copy.deepcopy(model)  # a deep copy carries no hooks: a plain model
    x, y = second[2]
    model.zero_grad()
    last = syn.last_replay
    step(model, syn, x, y)
    applied = [p.grad.clone() for p in model.parameters()]
    replay = syn.last_replay  # the rows this step replayed
    assert replay is not last

    # By hand: C from the labels the test itself fed in.
    seen = torch.cat([t for _, t in first + second])
    this_task = torch.cat([t for _, t in second]) if mask == "task" else y
    allowed = torch.zeros(10, dtype=torch.bool)
    allowed[this_task] = True
    allowed[int(seen.max()) :] = True
    assert allowed.tolist() == [False] * 5 + [True, mask == "task", True, True, True]
    assert len(replay["targets"]) == 6
    expected_loss = asymmetric_cross_entropy(snapshot(x), y, allowed) + alpha * F.cross_entropy(
        snapshot(replay["input:input"]), replay["targets"]
    )
    expected = torch.autograd.grad(expected_loss, list(snapshot.parameters()))
    for a, b in zip(applied, expected):
        assert torch.allclose(a, b, atol=1e-6)


def test_the_users_loss_is_replaced_not_added():
    torch.manual_seed(0)
    model = mlp()
    syn = ERACE(model, 40, 8)
    x, y = batches(1, [3, 4])[0]
    reference = copy.deepcopy(model)
    out = model(x)
    syn.backward(F.cross_entropy(out, y) * 1000 + out.sum(), y, input=x)  # anything: it is not backpropagated
    allowed = torch.zeros(10, dtype=torch.bool)
    allowed[y] = True
    allowed[int(y.max()) :] = True
    expected = torch.autograd.grad(asymmetric_cross_entropy(reference(x), y, allowed), list(reference.parameters()))
    for p, e in zip(model.parameters(), expected):
        assert torch.allclose(p.grad, e, atol=1e-6)


def test_current_loss_user_is_er():
    data = batches(8, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    models = []
    for make in (
        lambda m: ER(m, 30, 6, alpha=0.5, method="er"),
        lambda m: ERACE(m, 30, 6, alpha=0.5, current_loss="user"),
    ):
        torch.manual_seed(0)  # the same weights and the same buffer seed
        model = mlp()
        syn = make(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for x, y in data:
            step(model, syn, x, y, opt)
        models.append(model)
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)


def test_an_empty_batch_is_refused_and_changes_nothing():
    # (Bad hyperparameters and the generic bad calls are the contract's: tests/test_contract.py.)
    model = mlp()
    syn = ERACE(model, 40, 8, mask="task")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for x, y in batches(3, [0, 1, 2]):
        step(model, syn, x, y, opt)
    before = copy.deepcopy(syn.state_dict())
    x, y = batches(1, [5, 6], seed=4)[0]
    loss = F.cross_entropy(model(x), y)
    empty = torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match="non-empty"):
        syn.backward(loss, empty, input=x[:0])
    after = syn.state_dict()
    assert after["num_steps"] == before["num_steps"] == 3
    assert torch.equal(after["state"]["largest_seen"], before["state"]["largest_seen"])
    assert torch.equal(after["state"]["task_classes"], before["state"]["task_classes"])
    assert len(syn.buffer) == 24


def test_catalog_entry_trains_with_task_ends():
    spec = catalog.get("er-ace")
    assert spec.cls is ERACE and spec.family == "rehearsal" and spec.defaults()["mask"] == "batch"
    model = mlp()
    syn = spec.create(model, buffer_size=40, buffer_sample_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    seen = []
    for i, (x, y) in enumerate(batches(20, list(range(10)))):
        step(model, syn, x, y, opt)
        seen.append((y, {"input": x}))
        if i % 10 == 9:
            syn.end_task(seen)
            seen = []
    assert syn.num_steps == 20 and syn.num_tasks_ended == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
