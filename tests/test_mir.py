"""MIR (Aljundi et al. 2019): its score against hand computation, its choice against a direct
implementation (a deep copy and a real SGD step), and what its virtual step must leave alone."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import batches, step
from synapse import catalog
from synapse.functional import eligible_subset, interference_scores
from synapse.rehearsal import MIR

K, C, LR = 3, 10, 0.5


def tiny(kind: str = "plain") -> nn.Module:
    """A small MLP; ``'bn'``: with BatchNorm; ``'tied'``: two hidden layers share one weight."""
    torch.manual_seed(3)
    if kind == "tied":
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
        model[4].weight = model[2].weight
        return nn.Sequential(*model, nn.ReLU(), nn.Linear(16, 4))
    return nn.Sequential(nn.Linear(6, 16), *([nn.BatchNorm1d(16)] if kind == "bn" else []), nn.ReLU(), nn.Linear(16, 4))


def stream(n, seed=0):
    return batches(n, range(4), batch=5, seed=seed, shape=(6,))


def spy(syn):
    """Record each step's candidates (the rows gathered from the memory, with their slots); the replayed
    rows are ``syn.last_replay``."""
    seen = {}
    gather = syn.buffer.gather

    def recorded_gather(indices, names=None):
        out = gather(indices, names)
        if names is not None and "targets" in names:
            seen["candidates"], seen["slots"] = out, indices
        return out

    syn.buffer.gather = recorded_gather
    return seen


def naive_choice(model, x, y, xc, yc, lr, k, lowest=None):
    """The paper's recipe written directly: copy the model, take a real SGD step on the incoming batch,
    compare each candidate's loss before and after, keep the k largest increases (with ``lowest``, the
    increase over the lower of the loss before and the lowest remembered: the authors' option)."""
    before, after = copy.deepcopy(model), copy.deepcopy(model)
    F.cross_entropy(after(x), y).backward()
    torch.optim.SGD(after.parameters(), lr=lr).step()
    with torch.no_grad():
        pre = F.cross_entropy(before(xc), yc, reduction="none")
        base = pre if lowest is None else torch.minimum(pre, lowest)
        increase = F.cross_entropy(after(xc), yc, reduction="none") - base
    return increase.argsort(descending=True)[:k]


def test_interference_scores_by_hand():
    ln = math.log
    before = torch.tensor([[0.0, 0.0], [ln(3), 0.0]])
    after = torch.tensor([[0.0, ln(3)], [0.0, 0.0]])
    targets = torch.tensor([0, 0])
    # row 0: CE before = ln 2, after = -ln(1/4) = ln 4; row 1: before = -ln(3/4), after = ln 2
    expected = torch.tensor([ln(4) - ln(2), ln(2) - ln(4 / 3)])
    assert torch.allclose(interference_scores(before, after, targets), expected, atol=1e-6)
    # The authors' --compare_to_old_logits: the rise above min(today's loss, the lowest remembered).
    lowest = torch.tensor([ln(3), 0.25])  # row 0 keeps today's ln 2; row 1 was once at 0.25 < ln(4/3)
    expected = torch.tensor([ln(4) - ln(2), ln(2) - 0.25])
    assert torch.allclose(interference_scores(before, after, targets, lowest), expected, atol=1e-6)


def test_eligible_subset_by_hand():
    keys = torch.tensor([0.9, 0.5, 0.7, 0.1, 0.3])
    eligible = torch.tensor([False, True, True, True, False])
    indices, valid = eligible_subset(keys, eligible, 2)  # the eligible rows with the largest keys: 2 (0.7), 1 (0.5)
    assert indices.tolist() == [2, 1] and valid.tolist() == [True, True]
    indices, valid = eligible_subset(keys, eligible, 4)  # three eligible: padded with an ineligible row, marked
    assert indices[:3].tolist() == [2, 1, 3] and valid.tolist() == [True, True, True, False]
    with pytest.raises(ValueError, match="c must be"):
        eligible_subset(keys, eligible, 6)
    # Uniform over the eligible pairs (3 of them), as numpy.random.choice(..., replace=False) draws.
    gen = torch.Generator().manual_seed(0)
    counts: dict = {}
    for _ in range(3000):
        pair = tuple(sorted(eligible_subset(torch.rand(5, generator=gen), eligible, 2)[0].tolist()))
        counts[pair] = counts.get(pair, 0) + 1
    assert sorted(counts) == [(1, 2), (1, 3), (2, 3)] and all(900 < c < 1100 for c in counts.values())


@pytest.mark.parametrize("kind", ["plain", "bn", "tied"])
def test_replays_what_a_direct_implementation_picks(kind):
    model = tiny(kind)
    syn = MIR(model, buffer_size=30, buffer_sample_size=K, buffer_candidates=C, virtual_lr=LR)
    data = stream(12)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in data[:8]:
        step(model, syn, x, y, opt)
    seen = spy(syn)
    for x, y in data[8:]:
        loss = F.cross_entropy(model(x), y)
        ref = copy.deepcopy(model)  # after the user's forward, as MIR sees the model
        opt.zero_grad()
        syn.backward(loss, y, input=x)
        cand, replay = seen["candidates"], syn.last_replay
        xc, yc = cand["input:input"], cand["targets"]
        idx = naive_choice(ref, x, y, xc, yc, LR, K)
        assert xc.shape[0] == C and replay["input:input"].shape[0] == K
        assert torch.equal(replay["input:input"], xc[idx]) and torch.equal(replay["targets"], yc[idx])
        # The real gradient: the incoming batch's loss plus the replay cross-entropy, one backward.
        expected = torch.autograd.grad(
            F.cross_entropy(ref(x), y) + F.cross_entropy(ref(xc[idx]), yc[idx]), list(ref.parameters())
        )
        for p, g in zip(model.parameters(), expected):
            assert torch.allclose(p.grad, g, atol=1e-6)
        opt.step()


def test_past_tasks_candidates_come_from_ended_tasks_only():
    model = tiny()
    syn = MIR(model, buffer_size=40, buffer_sample_size=K, buffer_candidates=C, virtual_lr=LR, candidates="past_tasks")
    seen = spy(syn)
    for x, y in batches(6, [0, 1], batch=5, shape=(6,)):
        step(model, syn, x, y)
    assert syn.last_replay is None and not seen  # no past task yet: no replay (the authors' ``task > 0``)
    syn.end_task()
    for x, y in batches(6, [2, 3], batch=5, seed=1, shape=(6,)):
        step(model, syn, x, y)
        assert seen["candidates"]["targets"].shape == (C,) and bool((seen["candidates"]["targets"] < 2).all())
        assert syn.last_replay["targets"].shape == (K,) and bool((syn.last_replay["targets"] < 2).all())
    assert bool((syn.buffer.stored()["targets"] >= 2).any())  # the current task's items were there to exclude


def test_past_tasks_with_fewer_past_items_than_replayed():
    model = tiny()
    syn = MIR(model, buffer_size=30, buffer_sample_size=4, buffer_candidates=C, virtual_lr=LR, candidates="past_tasks")
    x, y = batches(1, [0], batch=2, shape=(6,))[0]
    step(model, syn, x, y)  # two items of task 0
    syn.end_task()
    x, y = batches(1, [1], batch=5, seed=1, shape=(6,))[0]
    step(model, syn, x, y)  # candidates: the two past items, no others
    x, y = batches(1, [1], batch=5, seed=2, shape=(6,))[0]
    ref = copy.deepcopy(model)
    loss = F.cross_entropy(model(x), y)
    model.zero_grad()
    syn.backward(loss, y, input=x)
    past = syn.buffer.stored()["targets"] == 0
    px, py = syn.buffer.stored()["input:input"][past], syn.buffer.stored()["targets"][past]
    # The replay loss is the mean over the two past items only, whatever else fills the minibatch.
    expected = torch.autograd.grad(F.cross_entropy(ref(x), y) + F.cross_entropy(ref(px), py), list(ref.parameters()))
    for p, g in zip(model.parameters(), expected):
        assert torch.allclose(p.grad, g, atol=1e-6)


def test_compare_to_old_logits_against_a_direct_implementation():
    model = tiny()
    # 14 batches of 5 fit in the memory: no slot is overwritten, so each keeps its item's lowest loss.
    syn = MIR(
        model, buffer_size=100, buffer_sample_size=K, buffer_candidates=C, virtual_lr=LR, compare_to_old_logits=True
    )
    data = stream(14)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in data[:8]:
        step(model, syn, x, y, opt)
    seen = spy(syn)
    for x, y in data[8:]:
        held = syn.buffer.stored()["mir_lowest_loss"].clone()
        n = held.shape[0]
        assert bool((held <= math.log(4)).any()) or n == 40  # some were scored already
        loss = F.cross_entropy(model(x), y)
        ref = copy.deepcopy(model)
        opt.zero_grad()
        syn.backward(loss, y, input=x)
        cand, slots = seen["candidates"], seen["slots"]
        xc, yc = cand["input:input"], cand["targets"]
        # The authors' stored logits start at zero: a loss of log(classes) until a lower one is seen.
        remembered = held[slots].clamp(max=math.log(4))
        idx = naive_choice(ref, x, y, xc, yc, LR, K, remembered)
        assert torch.equal(syn.last_replay["input:input"], xc[idx])
        with torch.no_grad():
            pre = F.cross_entropy(ref(xc), yc, reduction="none")
        after = syn.buffer.stored()["mir_lowest_loss"]
        assert torch.allclose(after[slots], torch.minimum(pre, remembered), atol=1e-6)
        others = torch.ones(n, dtype=torch.bool).index_fill_(0, slots, False)
        assert torch.equal(after[:n][others], held[others])  # the others keep theirs
        assert bool((after[n:] == torch.finfo(torch.float32).max).all())  # the new items: none seen yet
        opt.step()


def test_authors_options_resume_bit_identically():
    options = {"candidates": "past_tasks", "compare_to_old_logits": True}
    model = tiny()
    syn = MIR(model, buffer_size=20, buffer_sample_size=K, buffer_candidates=C, virtual_lr=LR, **options)
    for x, y in stream(6):
        step(model, syn, x, y)
    syn.end_task()
    for x, y in stream(3, seed=1):
        step(model, syn, x, y)
    twin_model = copy.deepcopy(model)
    twin = MIR(twin_model, buffer_size=20, buffer_sample_size=K, buffer_candidates=C, virtual_lr=LR, **options)
    twin.load_state_dict(syn.state_dict())
    opt, twin_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(twin_model.parameters(), lr=0.1)
    for x, y in stream(4, seed=2):
        step(model, syn, x, y, opt)
        step(twin_model, twin, x, y, twin_opt)
        assert torch.equal(syn.last_replay["input:input"], twin.last_replay["input:input"])
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), twin_model.parameters()))


def test_virtual_step_leaves_parameters_grads_and_statistics_alone(monkeypatch):
    model = tiny("bn")
    syn = MIR(model, buffer_size=30, buffer_sample_size=K, buffer_candidates=C, virtual_lr=LR)
    for x, y in stream(6):
        step(model, syn, x, y)
    x, y = stream(1, seed=9)[0]
    loss = F.cross_entropy(model(x), y)
    ref = copy.deepcopy(model)
    stats = ref[1].running_mean.clone(), int(ref[1].num_batches_tracked)  # after the user's forward
    params = [p.detach().clone() for p in model.parameters()]
    old = [torch.randn_like(p) for p in model.parameters()]  # gradients the user accumulated before
    for p, g in zip(model.parameters(), old):
        p.grad = g.clone()

    # No model copy: no deep copy, no new module built during the step.
    built = []
    init = nn.Module.__init__
    monkeypatch.setattr(nn.Module, "__init__", lambda self, *a, **k: (built.append(self), init(self, *a, **k))[1])
    monkeypatch.setattr(copy, "deepcopy", lambda *a, **k: pytest.fail("MIR deep-copied something"))
    syn.backward(loss, y, input=x)
    monkeypatch.undo()
    assert built == []

    replay = syn.last_replay["input:input"]
    for p, before in zip(model.parameters(), params):
        assert torch.equal(p, before)
    expected = torch.autograd.grad(
        F.cross_entropy(ref(x), y) + F.cross_entropy(ref(replay), syn.last_replay["targets"]),
        list(ref.parameters()),
    )
    for p, g0, g in zip(model.parameters(), old, expected):
        assert torch.allclose(p.grad, g0 + g, atol=1e-6)  # accumulated once: the virtual grad never lands
    # Only the replayed minibatch's forward moved the running statistics: one update, with its batch mean.
    bn = model[1]
    assert int(bn.num_batches_tracked) == stats[1] + 1
    assert torch.allclose(bn.running_mean, stats[0] * 0.9 + 0.1 * model[0](replay).mean(0), atol=1e-6)


def test_grad_scaler_picks_the_same_items():
    chosen = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**16)):
        model = tiny()
        torch.manual_seed(5)
        syn = MIR(model, buffer_size=30, buffer_sample_size=K, buffer_candidates=C, virtual_lr=LR, scaler=scaler)
        for x, y in stream(6):
            step(model, syn, x, y)
        x, y = stream(1, seed=9)[0]
        step(model, syn, x, y)
        chosen.append(syn.last_replay["input:input"])
    # A power-of-two scale is exact: the unscaled virtual step, hence the choice, is the same.
    assert torch.equal(*chosen)


def test_small_memory_replays_every_item():
    model = tiny()
    syn = MIR(model, buffer_size=30, buffer_sample_size=8, buffer_candidates=C, virtual_lr=LR)
    x, y = stream(1)[0]
    step(model, syn, x, y)  # stores 5 items
    step(model, syn, *stream(1, seed=1)[0])
    assert syn.last_replay["input:input"].shape[0] == 5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        # (Each argument's own range is the contract's: tests/test_contract.py.)
        ({"buffer_candidates": 5, "buffer_sample_size": 6}, "buffer_candidates must be at least"),
        ({"candidates": "current"}, "candidates must be one of"),
        ({"compare_to_old_logits": 1}, "compare_to_old_logits must be a bool"),
    ],
)
def test_bad_arguments_are_rejected_and_change_nothing(kwargs, message):
    model = tiny()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises((ValueError, TypeError), match=message):
        MIR(model, **kwargs)
    assert not model._forward_hooks and not model._forward_pre_hooks  # no capture left behind
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_catalog_entry():
    spec = catalog.get("mir")
    assert spec.cls is MIR and spec.family == "rehearsal" and spec.task_free
    syn = spec.create(tiny(), buffer_size=40, buffer_sample_size=8)
    assert (syn.buffer_candidates, syn.virtual_lr, syn.buffer_sample_size, syn.fused) == (50, 0.1, 8, False)
    assert (syn.candidates, syn.compare_to_old_logits) == ("all", False)  # the paper's task-free rule by default
