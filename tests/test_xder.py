"""X-DER: its pure functions against hand computations, its gradient against the explicit objective, its
memory (task-end fill, future-past updates), resume and rejected input."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import mlp
from synapse import catalog
from synapse._draw_ahead import STEPS, DrawAhead
from synapse.experiments.models import create_model
from synapse.functional import head_margin_constraint, xder_update_logits
from synapse.rehearsal import XDER
from synapse.rehearsal.xder import _chunks, _first_occurrence, _float32_uniforms

CPT = 2  # classes per task in the class-incremental streams below: task t holds classes 2t, 2t + 1


# ---------------------------------------------------------------------- pure functions
def test_update_logits_rescales_transplanted_columns_by_hand():
    stored = torch.tensor([[3.0, 1.0, 0.0, 0.0], [0.5, 2.0, 0.0, 0.0]])
    new = torch.tensor([[9.0, 9.0, 6.0, 1.5], [9.0, 9.0, 1.0, 0.5]])
    columns = torch.tensor([False, False, True, True])
    out = xder_update_logits(stored, new, torch.tensor([0, 1]), columns, gamma=0.5)
    # row 0: truth 3 < max 6: columns 2, 3 become [6, 1.5] * 0.5 * 3 / 6 = [1.5, 0.375]
    # row 1: truth 2 > max 1: columns 2, 3 become [1, 0.5] unscaled; columns 0, 1 always stay
    assert out.tolist() == [[3.0, 1.0, 1.5, 0.375], [0.5, 2.0, 1.0, 0.5]]
    assert stored[0, 2] == 0.0  # not modified in place


def test_update_logits_damps_past_heads_of_a_new_item_by_hand():
    # an item stored at its task's end: stored = new = its outputs, columns = the past classes 0, 1
    outputs = torch.tensor([[4.0, 2.0, 1.0, 0.0], [1.0, 0.5, 2.0, 0.0]])
    out = xder_update_logits(outputs, outputs, torch.tensor([2, 2]), torch.tensor([True, True, False, False]), 0.85)
    # row 0: truth 1 < past max 4: past columns * 0.85 * 1 / 4 = [0.85, 0.425]; row 1: truth 2 > 1: unchanged
    assert torch.allclose(out, torch.tensor([[0.85, 0.425, 1.0, 0.0], [1.0, 0.5, 2.0, 0.0]]))


def test_head_margin_constraint_by_hand():
    scores = torch.tensor([[1.0, 3.0, 2.0], [2.0, 0.0, 1.0], [0.0, 0.5, 4.0]], requires_grad=True)
    good = torch.tensor([True, False, False])
    bad = torch.tensor([False, True, True])
    # v = max(bad) + 0.5 - good: row 0: 3 + 0.5 - 1 = 2.5; row 1: 1 + 0.5 - 2 = -0.5 (out); row 2: 4.5
    loss = head_margin_constraint(scores, good, bad, 0.5)
    assert loss.item() == pytest.approx((2.5 + 4.5) / 2)
    loss.backward()
    # d/ds: +1/2 at each active row's bad argmax, -1/2 at its good column
    assert scores.grad.tolist() == [[-0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [-0.5, 0.0, 0.5]]
    # weights drop rows; detach_bad stops the gradient at max(bad); per-row masks work
    scores.grad = None
    loss = head_margin_constraint(scores, good, bad, 0.5, torch.tensor([1.0, 1.0, 0.0]), detach_bad=True)
    assert loss.item() == pytest.approx(2.5)
    loss.backward()
    assert scores.grad.tolist() == [[-1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    rows_good = torch.tensor([[True, False, False], [False, True, False], [True, False, False]])
    # row 1 now favours column 1 (score 0): v = max(0, 1) + 0.5 - 0 = 1.5, active
    assert head_margin_constraint(scores, rows_good, bad, 0.5).item() == pytest.approx((2.5 + 1.5 + 4.5) / 3)


def test_head_margin_constraint_with_no_bad_columns_is_zero_with_finite_gradient():
    scores = torch.randn(4, 3, requires_grad=True)
    loss = head_margin_constraint(scores, torch.tensor([True, True, True]), torch.zeros(3, dtype=torch.bool), 0.3)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(scores.grad, torch.zeros(4, 3))


def test_first_occurrence_and_chunks():
    assert _first_occurrence(torch.tensor([5, 2, 7, 2, 5, 9])).tolist() == [0, 1, 2, 1, 0, 5]
    assert _chunks(9, 4) == [slice(0, 4), slice(4, 9)]  # no single-row chunk for train-mode BatchNorm
    assert _chunks(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)] and _chunks(1, 4) == [slice(0, 1)]


# ---------------------------------------------------------------------- the method
def task_data(task, n=24, features=20):
    g = torch.Generator().manual_seed(100 + task)
    return torch.randn(n, features, generator=g), torch.arange(n) % CPT + task * CPT


def batches(x, y, size=8):
    return [(y[i : i + size], {"input": x[i : i + size]}) for i in range(0, len(y), size)]


def train(syn, model, opt, x, y, size=8):
    for targets, inputs in batches(x, y, size):
        loss = F.cross_entropy(model(**inputs), targets)
        opt.zero_grad()
        syn.backward(loss, targets, **inputs)
        opt.step()


def setup(**kwargs):
    model = mlp(num_classes=6, in_features=20)
    args = dict(buffer_size=10, buffer_sample_size=4, alpha=0.7, beta=0.6, gamma=0.85, eta=0.9, m=0.05)
    args.update(kwargs)
    syn = XDER(model, **args)
    return model, syn, torch.optim.SGD(model.parameters(), lr=0.05)


def stored(syn):
    return syn.buffer.gather(torch.arange(len(syn.buffer)))


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("current_loss", ["method", "user"])
@pytest.mark.parametrize("revision", ["2022", "2024"])
def test_gradient_is_the_explicit_objective_and_replayed_past_items_are_updated(fused, current_loss, revision):
    # revision 2022: mammoth's xder_ce before commit b558503; 2024: from it (present head only in the
    # batch's softmax, no past constraint, no replay in the first task)
    alpha, beta, eta, m, gamma = 0.7, 0.6, 0.9, 0.05, 0.85
    model, syn, opt = setup(fused=fused, current_loss=current_loss, revision=revision)
    x0, y0 = task_data(0)
    train(syn, model, opt, x0, y0)
    assert (syn.last_replay is None) == (revision == "2024") and len(syn.buffer) == 10
    syn.end_task(batches(x0, y0))
    x, y = task_data(1, n=8)  # task 1: classes 2, 3 present, 0, 1 past, 4, 5 future
    with torch.no_grad():  # as if trained since the task end: today's responses differ from the stored ones
        model[-1].weight.add_(torch.randn_like(model[-1].weight))
    before = stored(syn)
    last = syn.last_replay
    reference = copy.deepcopy(model)  # a plain model: a copy's hooks are inert
    out = model(input=x)
    opt.zero_grad()
    syn.backward(F.cross_entropy(out, y), y, input=x)
    sample = syn.last_replay  # the rows this step replayed, and the slots they came from
    assert sample is not last
    k = sample["targets"].shape[0] // 2
    x1, x2 = sample["input:input"][:k], sample["input:input"][k:]
    z1, y2 = sample["logits"][:k], sample["targets"][k:]

    o, o1, o2 = reference(x), reference(x1), reference(x2)
    heads = o[:, 2:] if revision == "2022" else o[:, 2:4]  # 2024: the future heads 4, 5 leave the softmax
    stream = F.cross_entropy(heads, y - 2) if current_loss == "method" else F.cross_entropy(o, y)
    der = ((o1 - z1) ** 2).mean()
    derpp = F.cross_entropy(o2[:, :2], y2)
    slots = sample["slots"].tolist()
    distinct = [i for i, s in enumerate(slots) if slots.index(s) == i]
    rows = torch.cat([o, torch.cat([o1, o2])[distinct]])
    labels = torch.cat([y, sample["targets"][distinct]])
    own = torch.stack([rows[i, 2 * (c // 2) : 2 * (c // 2) + 2].max() for i, c in enumerate(labels.tolist())])
    v = rows[:, 4:].max(1).values + m - own
    future = v[v > 0].mean()
    p = torch.softmax(o[:, :4], 1)
    u = p[:, :2].max(1).values.detach() + m - p[:, 2:].max(1).values
    past = u[u > 0].mean() if revision == "2022" else 0.0
    assert 0 < (v > 0).sum() < len(v) and (u > 0).any()  # both terms count, and the future mask bites
    (stream + alpha * der + beta * derpp + eta * future + eta * past).backward()
    for got, want in zip(grads(model), grads(reference)):
        assert torch.allclose(got, want, atol=1e-6)

    # The replayed past items (drawn for the first time: probability 1) took today's responses on the
    # present and future heads, rescaled; every other slot and column is as it was.
    after = stored(syn)
    responses = torch.cat([o1, o2]).detach()
    assert len(set(slots)) < len(slots)  # an item drawn in both minibatches is updated once
    for slot in range(len(before["targets"])):
        if slot not in slots:
            assert torch.equal(after["logits"][slot], before["logits"][slot])
            continue
        i = slots.index(slot)
        z, r, label = before["logits"][slot], responses[i, 2:], int(before["targets"][slot])
        if r.max() > z[label]:
            r = r * gamma * z[label] / r.max()
        assert torch.equal(after["logits"][slot, :2], z[:2])
        assert torch.allclose(after["logits"][slot, 2:], r, atol=1e-6)
    counts = torch.zeros(10)
    counts[sorted(set(slots))] = 1
    assert torch.equal(syn._update_count, counts)


@pytest.mark.parametrize("revision", ["2022", "2024"])
def test_task_ends_fill_a_class_balanced_memory_and_rewrite_the_future_past(revision):
    model, syn, opt = setup(revision=revision)
    x0, y0 = task_data(0)
    train(syn, model, opt, x0, y0)
    assert len(syn.buffer) == 10  # a reservoir during the first task
    reference = copy.deepcopy(model)
    syn.end_task(batches(x0, y0))
    # first task end: the reservoir is replaced by the task's first 5 items of each class, in data order,
    # with their own outputs as logits (no past head to damp)
    memory = stored(syn)
    first = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert torch.equal(memory["input:input"], x0[first]) and torch.equal(memory["targets"], y0[first])
    assert torch.allclose(memory["logits"], reference(x0[first]), atol=1e-6)

    x1, y1 = task_data(1)
    train(syn, model, opt, x1, y1)
    before, reference = stored(syn), copy.deepcopy(model)
    syn.end_task(batches(x1, y1))
    memory = stored(syn)
    # floor(10 / 4 seen classes) = 2 kept per past class (the first in slot order), 3 each for classes 2, 3
    kept = [i for c in (0, 1) for i in (before["targets"] == c).nonzero().flatten()[:2].tolist()]
    assert memory["targets"].tolist() == [0, 0, 1, 1, 2, 3, 2, 3, 2, 3]
    assert torch.equal(memory["input:input"][:4], before["input:input"][kept])
    assert torch.equal(memory["input:input"][4:], x1[:6])
    # past items: the just-learned head 2, 3 (2024: and the future head 4, 5) takes today's responses,
    # rescaled below the true logit; the other heads stay as stored
    cols = slice(2, 4) if revision == "2022" else slice(2, 6)
    for row, slot in enumerate(kept):
        z, r, label = before["logits"][slot], reference(before["input:input"][slot : slot + 1])[0, cols], row // 2
        if r.max() > z[label]:
            r = r * 0.85 * z[label] / r.max()
        assert torch.equal(memory["logits"][row, :2], z[:2])
        assert revision == "2024" or torch.equal(memory["logits"][row, 4:], z[4:])
        assert torch.allclose(memory["logits"][row, cols], r, atol=1e-6)
        assert not torch.allclose(memory["logits"][row, cols], z[cols])
    # new items: their own outputs, past heads damped below their true logit
    for row in range(4, 10):
        o, label = reference(memory["input:input"][row : row + 1])[0], int(memory["targets"][row])
        past = o[:2] * 0.85 * o[label] / o[:2].max() if o[:2].max() > o[label] else o[:2]
        assert torch.allclose(memory["logits"][row], torch.cat([past, o[2:]]), atol=1e-6)
    assert torch.equal(syn._update_count, torch.zeros(10))


def snapshot(syn):
    return copy.deepcopy(syn.state_dict())


def assert_same_state(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        for u, v in zip(a, b):
            assert_same_state(u, v)
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize(
    "kwargs",
    # gamma is not a catalog hyperparameter; those that are, the contract checks (tests/test_contract.py)
    [dict(gamma=0.0), dict(gamma=1.5), dict(gamma=True), dict(revision="2023")],
)
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        XDER(mlp(), **kwargs)


def test_rejected_calls_change_nothing():
    model, syn, opt = setup()
    x0, y0 = task_data(0)
    train(syn, model, opt, x0, y0)
    # a bad batch after a good one: the task-end pass stops before anything is committed
    before = snapshot(syn)
    bad = [batches(x0, y0)[0], (y0[:8], {"input": torch.randn(8, 21)})]
    with pytest.raises(ValueError, match="per-item shape"):
        syn.end_task(bad)
    assert_same_state(syn.state_dict(), before)
    syn.end_task(batches(x0, y0))
    # a head that changes width (X-DER needs the future heads from the start)
    model[-1] = torch.nn.Linear(100, 8)
    out = model(input=x0[:8])
    before = snapshot(syn)
    with pytest.raises(ValueError, match="fixed width"):
        syn.backward(F.cross_entropy(out, y0[:8]), y0[:8], input=x0[:8])
    assert_same_state(syn.state_dict(), before)


def test_catalog_spec_runs_the_generic_loop():
    spec = catalog.get("xder")
    assert spec.family == "rehearsal" and spec.defaults()["gamma"] == 0.85
    model = mlp()
    syn = spec.create(model, buffer_size=40, buffer_sample_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = []
    for step in range(20):
        x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
        data.append((y, {"input": x}))
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        syn.backward(loss, y, input=x)
        opt.step()
        if step % 10 == 9:
            syn.end_task(data)
            data = []
    assert all(torch.isfinite(p).all() for p in model.parameters())
    counts = stored(syn)["targets"].bincount(minlength=10)
    assert counts.max() - counts.min() <= 4 and len(syn.buffer) <= 40


def test_the_floor_updates_the_replayed_past_items_logits_as_the_method_does():
    # The floor's step includes X-DER's memory update: the replayed items of past classes (0-3 in the floor's
    # tasks of two classes), drawn for the first time, take today's responses on the other heads, rescaled.
    torch.manual_seed(0)
    spec = catalog.get("xder")
    model = create_model("mlp", 1, 28, 10, [0.5], [0.25])
    floor = spec.floor(model, 40, 5, (1, 28, 28), spec.resolve(spec.harness_hparams))
    before = floor.z.clone()
    x, y = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (8,))
    logits = floor.forward(x)
    responses = torch.cat(floor.replayed).detach()
    floor.backward(F.cross_entropy(logits, y), y, x, logits)
    slots = floor.idx.tolist()
    past = [s for s in set(slots) if int(floor.y[s]) < 4]
    assert past and len(past) < len(set(slots))  # both kinds were drawn
    want = before.clone()
    for slot in past:
        i = slots.index(slot)
        want[slot] = xder_update_logits(
            before[slot : slot + 1],
            responses[i : i + 1],
            floor.y[slot : slot + 1],
            torch.arange(10) >= 4,
            spec.resolve({})["gamma"],
        )[0]
    assert torch.allclose(floor.z, want) and not torch.equal(floor.z, before)
    counts = torch.zeros(40)
    counts[past] = 1
    assert torch.equal(floor.counts, counts)


@pytest.mark.parametrize("buffered_half", [False, True])
def test_draws_made_ahead_equal_step_by_step_draws_and_leave_the_generator_as_they_would(buffered_half):
    # X-DER's memory-update draws come from a block drawn ahead; the values, and the generator's state whenever
    # it is read (a checkpoint, a task end), must be those of one random(n) per step. A 32-bit draw before
    # leaves half an output buffered, which double draws keep and advance() would clear.
    plain = np.random.Generator(np.random.PCG64(7))
    if buffered_half:
        plain.integers(0, 5, size=3, dtype=np.uint32)
    ahead = DrawAhead(copy.deepcopy(plain))
    cpu = torch.device("cpu")
    for steps in (3, 0, STEPS + 2):
        for _ in range(steps):
            want = torch.from_numpy(plain.random(6).astype(np.float32))
            assert torch.equal(ahead.peek(("update", 6, cpu), _float32_uniforms(6, cpu)), want)
            assert torch.equal(ahead.peek(("update", 6, cpu), _float32_uniforms(6, cpu)), want)  # a failed step
            ahead.consume()
        ahead.peek(("update", 6, cpu), _float32_uniforms(6, cpu))  # peeked, never consumed: not drawn
        assert ahead.generator().bit_generator.state == plain.bit_generator.state
    assert plain.bit_generator.state["has_uint32"] == int(buffered_half)
