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
from synapse.functional import interference_scores
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
    """Record each step's candidates (the memory's draw); the replayed rows are ``syn.last_replay``."""
    seen = {}
    sample = syn.buffer.sample

    def recorded_sample(*args, **kwargs):
        seen["candidates"] = out = sample(*args, **kwargs)
        return out

    syn.buffer.sample = recorded_sample
    return seen


def naive_choice(model, x, y, xc, yc, lr, k):
    """The paper's recipe written directly: copy the model, take a real SGD step on the incoming batch,
    compare each candidate's loss before and after, keep the k largest increases."""
    before, after = copy.deepcopy(model), copy.deepcopy(model)
    F.cross_entropy(after(x), y).backward()
    torch.optim.SGD(after.parameters(), lr=lr).step()
    with torch.no_grad():
        increase = F.cross_entropy(after(xc), yc, reduction="none") - F.cross_entropy(before(xc), yc, reduction="none")
    return increase.argsort(descending=True)[:k]


def test_interference_scores_by_hand():
    ln = math.log
    before = torch.tensor([[0.0, 0.0], [ln(3), 0.0]])
    after = torch.tensor([[0.0, ln(3)], [0.0, 0.0]])
    targets = torch.tensor([0, 0])
    # row 0: CE before = ln 2, after = -ln(1/4) = ln 4; row 1: before = -ln(3/4), after = ln 2
    expected = torch.tensor([ln(4) - ln(2), ln(2) - ln(4 / 3)])
    assert torch.allclose(interference_scores(before, after, targets), expected, atol=1e-6)


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
    ],
)
def test_bad_arguments_are_rejected_and_change_nothing(kwargs, message):
    model = tiny()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        MIR(model, **kwargs)
    assert not model._forward_hooks and not model._forward_pre_hooks  # no capture left behind
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_catalog_entry():
    spec = catalog.get("mir")
    assert spec.cls is MIR and spec.family == "rehearsal" and spec.task_free
    syn = spec.create(tiny(), buffer_size=40, buffer_sample_size=8)
    assert (syn.buffer_candidates, syn.virtual_lr, syn.buffer_sample_size, syn.fused) == (50, 0.1, 8, False)
