"""EWC and MAS: their importances and penalties against hand computations and plain autograd."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import mlp
from synapse import catalog
from synapse.functional import (
    empirical_fisher_diagonal,
    mas_importance,
    merge_quadratic_penalties,
    quadratic_penalty,
    running_average_importance,
    true_fisher_diagonal,
)
from synapse.structure import EWC, MAS
from synapse.structure._importance import joined
from synapse.structure._per_sample import LayerwiseSums

# Two samples for a Linear(2, 2) model, worked out by hand below.
X = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
Y = torch.tensor([0, 1])


def linear(weight, bias):
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(weight))
        model.bias.copy_(torch.tensor(bias))
    return model


def task(x, y, batch=None):
    """(targets, {"input": x}) batches, as end_task takes them."""
    batch = batch or len(y)
    return [(y[i : i + batch], {"input": x[i : i + batch]}) for i in range(0, len(y), batch)]


def random_task(n=12, seed=0, classes=10, features=(1, 28, 28)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *features, generator=g), torch.randint(0, classes, (n,), generator=g)


# ---------------------------------------------------------------------------------------------- pure maths
# With W = 0 and b = (ln 3, 0), p = softmax(b) = (3/4, 1/4) for every x, and
# d log p_c / dW = (e_c - p) x^T, d log p_c / db = e_c - p.
#   sample 1: x = (1, 2),  y = 0: e_y - p = ( 1/4, -1/4) -> dW = [[ 1/4,  1/2], [-1/4, -1/2]]
#   sample 2: x = (3, -1), y = 1: e_y - p = (-3/4,  3/4) -> dW = [[-9/4,  3/4], [ 9/4, -3/4]]
GRADS_W = torch.tensor([[[0.25, 0.5], [-0.25, -0.5]], [[-2.25, 0.75], [2.25, -0.75]]])
GRADS_B = torch.tensor([[0.25, -0.25], [-0.75, 0.75]])
# Empirical Fisher, the mean of the squares: W: (1/16 + 81/16)/2 = 2.5625, (1/4 + 9/16)/2 = 0.40625.
EMPIRICAL_W = torch.tensor([[2.5625, 0.40625], [2.5625, 0.40625]])
EMPIRICAL_B = torch.tensor([0.3125, 0.3125])  # (1/16 + 9/16) / 2
# True Fisher: sum_c p_c (e_c - p)_i^2 = p_i (1 - p_i) = 3/16 for both rows i, times the mean of x_j^2,
# which is (1 + 9)/2 = 5 and (4 + 1)/2 = 2.5.
TRUE_W = torch.tensor([[0.9375, 0.46875], [0.9375, 0.46875]])
TRUE_B = torch.tensor([0.1875, 0.1875])
# MAS with W = I, b = 0: f(x) = x, d ||f||^2 / dW = 2 f x^T = 2 x x^T, d/db = 2 x.
#   sample 1: [[2, 4], [4, 8]], (2, 4); sample 2: [[18, -6], [-6, 2]], (6, -2).
MAS_W = torch.tensor([[10.0, 5.0], [5.0, 5.0]])  # mean of the absolute values
MAS_B = torch.tensor([4.0, 3.0])


def test_empirical_fisher_by_hand():
    fw, fb = empirical_fisher_diagonal([GRADS_W, GRADS_B])
    assert torch.allclose(fw, EMPIRICAL_W) and torch.allclose(fb, EMPIRICAL_B)
    sw, _ = empirical_fisher_diagonal([GRADS_W, GRADS_B], reduction="sum")
    assert torch.allclose(sw, 2 * EMPIRICAL_W)


def test_true_fisher_by_hand():
    p = torch.tensor([0.75, 0.25])
    e = torch.eye(2)
    # per-class gradients: (e_c - p) x^T for c = 0, 1; shape (N, C, 2, 2)
    per_class_w = torch.stack([torch.stack([torch.outer(e[c] - p, x) for c in range(2)]) for x in X])
    per_class_b = torch.stack([torch.stack([e[c] - p for c in range(2)]) for _ in X])
    fw, fb = true_fisher_diagonal([per_class_w, per_class_b], p.expand(2, 2))
    assert torch.allclose(fw, TRUE_W) and torch.allclose(fb, TRUE_B)


def test_mas_importance_by_hand():
    grads_w = torch.tensor([[[2.0, 4.0], [4.0, 8.0]], [[18.0, -6.0], [-6.0, 2.0]]])
    grads_b = torch.tensor([[2.0, 4.0], [6.0, -2.0]])
    ow, ob = mas_importance([grads_w, grads_b])
    assert torch.equal(ow, MAS_W) and torch.equal(ob, MAS_B)


def test_running_average_importance_by_hand():
    # alpha 0.25: 0.25 * (4, 0, 8) + 0.75 * (0, 2, 8) = (1, 1.5, 8); the first task end takes the new one.
    old, new = [torch.tensor([4.0, 0.0, 8.0])], [torch.tensor([0.0, 2.0, 8.0])]
    assert torch.equal(running_average_importance(old, new, 0.25)[0], torch.tensor([1.0, 1.5, 8.0]))
    assert torch.equal(running_average_importance(old, new, 0.25, first=True)[0], new[0])
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="alpha"):
            running_average_importance(old, new, bad)
    with pytest.raises(ValueError, match="as many"):
        running_average_importance(old, [], 0.5)


def test_merge_quadratic_penalties_by_hand():
    # F1 = (1, 0, 2) at (0, 5, 1); F2 = (3, 0, 0) at (2, 7, 9):
    # S = (4, 0, 2); anchor = ((0 + 6)/4, none pulls -> 0, (2 + 0)/2) = (1.5, 0, 1).
    total, anchor = merge_quadratic_penalties(
        [[torch.tensor([1.0, 0.0, 2.0])], [torch.tensor([3.0, 0.0, 0.0])]],
        [[torch.tensor([0.0, 5.0, 1.0])], [torch.tensor([2.0, 7.0, 9.0])]],
    )
    assert torch.equal(total[0], torch.tensor([4.0, 0.0, 2.0]))
    assert torch.equal(anchor[0], torch.tensor([1.5, 0.0, 1.0]))
    with pytest.raises(ValueError, match="reduction"):
        mas_importance([GRADS_W], reduction="max")


# ---------------------------------------------------------------------------------------------- the classes
@pytest.mark.parametrize("fisher, want_w, want_b", [("empirical", EMPIRICAL_W, EMPIRICAL_B), ("true", TRUE_W, TRUE_B)])
@pytest.mark.parametrize("batch", [1, 2])
def test_ewc_fisher_of_a_linear_model_by_hand(fisher, want_w, want_b, batch):
    model = linear([[0.0, 0.0], [0.0, 0.0]], [math.log(3.0), 0.0])
    syn = EWC(model, fisher=fisher)
    syn.end_task(task(X, Y, batch))
    fw, fb = syn.importance
    assert torch.allclose(fw, want_w, atol=1e-6) and torch.allclose(fb, want_b, atol=1e-6)
    assert torch.equal(syn.anchor[0], model.weight.detach()) and torch.equal(syn.anchor[1], model.bias.detach())


def test_mas_importance_of_a_linear_model_by_hand():
    model = linear([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0])
    syn = MAS(model)
    syn.end_task(task(X, Y, 1))
    assert torch.allclose(syn.importance[0], MAS_W) and torch.allclose(syn.importance[1], MAS_B)


def loop_importance(model, x, y, kind):
    """The reference: one autograd call per sample (and per class for the true Fisher), eval mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    model.eval()

    def grad(scalar, **kwargs):  # a parameter the sample does not use has a zero gradient
        grads = torch.autograd.grad(scalar, params, allow_unused=True, **kwargs)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    for i in range(len(y)):
        out = model(x[i : i + 1])[0]
        if kind == "mas":
            grads = grad(out.square().sum())
            total = [t + g.abs() for t, g in zip(total, grads)]
            continue
        log_p = out.log_softmax(-1)
        classes = [(int(y[i]), 1.0)] if kind == "empirical" else [(c, log_p[c].exp().item()) for c in range(len(out))]
        for c, weight in classes:
            grads = grad(log_p[c], retain_graph=True)
            total = [t + weight * g.square() for t, g in zip(total, grads)]
    model.train()
    return [t / len(y) for t in total]


@pytest.mark.parametrize("kind", ["empirical", "true", "mas"])
def test_vmap_importance_equals_a_loop_over_samples(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5))
    model[0].bias.requires_grad_(False)  # frozen: skipped by the method, a constant in its pass
    x, y = random_task(10, classes=5, features=(6,))
    syn = MAS(model) if kind == "mas" else EWC(model, fisher=kind)
    syn.end_task(task(x, y, 4))  # batches of 4, 4 and 2
    want = loop_importance(model, x, y, kind)
    assert len(syn.importance) == len(want) == 3
    for got, ref in zip(syn.importance, want):
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-7)


class LinearTwice(nn.Module):
    """One linear layer called twice: each sample's gradient sums both uses, so it cannot be taken apart."""

    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(6, 6), nn.Linear(6, 5)

    def forward(self, input):
        return self.out(torch.tanh(self.a(torch.tanh(self.a(input)))))


class OnceWithoutGrad(nn.Module):
    """A layer called twice, once under no_grad: only the other call has gradients."""

    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(6, 6), nn.Linear(6, 5)

    def forward(self, input):
        with torch.no_grad():
            h = self.a(input)
        return self.out(torch.tanh(self.a(input)) * h)


class UsedOutside(nn.Module):
    """A layer's weight used again outside the layer (by hand-tied weights), and a layer never called."""

    def __init__(self):
        super().__init__()
        self.a, self.out, self.unused = nn.Linear(6, 6), nn.Linear(6, 5), nn.Linear(6, 5)

    def forward(self, input):
        h = torch.tanh(self.a(input))
        return self.out(h) + h @ self.a.weight[:5].t()


class OnASequence(nn.Module):
    """A linear layer on (batch, positions, features): dim 0 need not be the samples, so it is left to vmap."""

    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(2, 4), nn.Linear(12, 5)

    def forward(self, input):
        return self.out(torch.tanh(self.a(input.view(-1, 3, 2))).flatten(1))


def conv_net():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, stride=2),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),  # changes the BatchNorm's output in place
        nn.Conv2d(4, 4, 2, groups=2, dilation=2, padding=1),
        nn.GroupNorm(2, 4),
        nn.Flatten(),
        nn.Linear(64, 5),
    )
    model(torch.randn(16, 2, 8, 8))  # running statistics that are not the defaults
    return model, (2, 8, 8)


def conv1d_net():
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.LayerNorm(18), nn.Linear(18, 8), nn.ReLU(True))
    return nn.Sequential(model, nn.Linear(8, 5)), (2, 8)


def hooked_net():
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
    model[0].register_forward_hook(lambda module, args, output: 2 * output)  # changes what the layer returns
    return model


# model, input shape, the parameters the layer-by-layer pass must take apart itself (the rest: vmap)
ZOO = {
    "conv2d-batchnorm-groupnorm": (*conv_net(), "all"),
    "conv1d-layernorm-inplace": (*conv1d_net(), "all"),
    "linear-called-twice": (LinearTwice(), (6,), {"out.weight", "out.bias"}),
    "called-twice-once-without-grad": (OnceWithoutGrad(), (6,), {"out.weight", "out.bias"}),
    "layer-with-a-forward-hook": (hooked_net(), (6,), {"2.weight", "2.bias"}),
    "batchnorm-without-running-statistics": (
        nn.Sequential(
            nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten(), nn.Linear(144, 5)
        ),
        (2, 8, 8),
        set(),  # it normalises over the batch in eval mode too: the samples are not independent
    ),
    "output-changed-in-place": (nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 5)), (6,), "all"),
    "weight-used-outside": (UsedOutside(), (6,), {"a.bias", "out.weight", "out.bias", "unused.weight", "unused.bias"}),
    "linear-on-a-sequence": (OnASequence(), (6,), {"out.weight", "out.bias"}),
}


@pytest.mark.parametrize("kind", ["empirical", "true", "mas"])
@pytest.mark.parametrize("name", list(ZOO))
def test_layer_by_layer_sums_equal_a_loop_over_samples(name, kind):
    """Each kind of layer the fast pass takes apart, and each case it must leave to vmap, against one
    autograd call per sample; and the pass covers exactly what it can."""
    model, shape, covered = ZOO[name]
    x, y = random_task(10, classes=5, features=shape)
    syn = MAS(model) if kind == "mas" else EWC(model, fisher=kind)
    model.eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    scalars = lambda out: syn._scalars(out, y)  # noqa: E731
    _, sums = LayerwiseSums(model, list(params), syn._phi)({"input": x}, scalars)
    assert set(sums) == (set(params) if covered == "all" else covered)
    model.train()
    syn.end_task(task(x, y, 4))
    want = loop_importance(model, x, y, kind)
    for n, got, ref in zip(params, syn.importance, want):
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-7), n
    if covered == "all":
        assert all(torch.allclose(sums[n] / len(y), ref, rtol=1e-4, atol=1e-7) for n, ref in zip(params, want))


class InputChanged(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(6, 6), nn.Linear(6, 5)

    def forward(self, input):
        h = self.a(input) * 1.0
        out = self.out(h)
        h.add_(1.0)  # after the layer read it
        return out + h[:, :5]


@pytest.mark.parametrize("make", [EWC, MAS])
def test_an_input_changed_after_its_layer_read_it_is_an_error_not_a_wrong_sum(make):
    x, y = random_task(4, classes=5, features=(6,))
    with pytest.raises(RuntimeError, match="inplace"):  # as autograd itself says, per sample too
        loop_importance(InputChanged(), x, y, "mas")
    with pytest.raises(RuntimeError, match="inplace"):
        make(InputChanged()).end_task(task(x, y))


def test_joined_batches():
    def batch(n, width=3, name="input"):
        return torch.arange(n), {name: torch.ones(n, width)}

    sizes = [len(t) for t, _ in joined([batch(2), batch(3), batch(4), batch(9), batch(1), batch(1)], 5)]
    assert sizes == [5, 4, 9, 2]  # up to 5 samples; a larger batch passes whole
    sizes = [len(t) for t, _ in joined([batch(2), batch(2, width=4), batch(2, name="x"), batch(2, name="x")], 8)]
    assert sizes == [2, 2, 4]  # other shapes or names start a new batch
    targets, inputs = next(joined([batch(2), batch(3)], 8))
    assert torch.equal(targets, torch.tensor([0, 1, 0, 1, 2])) and inputs["input"].shape == (5, 3)


@pytest.mark.parametrize("make", [EWC, MAS])
def test_joining_batches_changes_nothing_but_speed(make):
    torch.manual_seed(0)
    model = mlp(num_classes=4, in_features=12)
    x, y = random_task(30, classes=4, features=(12,))
    data = task(x.view(30, 1, 12), y, 7)
    as_given, joined_up = make(model, task_end_batch=1), make(model)
    as_given.end_task(data)
    joined_up.end_task(data)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(as_given.importance, joined_up.importance))


def test_the_task_pass_leaves_the_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    model[4].eval()  # a submodule in its own mode: restored as it was
    x, y = random_task(8, classes=3, features=(12,))
    F.cross_entropy(model(x), y).backward()
    for syn in (EWC(model), EWC(model, fisher="true"), MAS(model)):
        grads = [p.grad.clone() for p in model.parameters()]
        buffers = copy.deepcopy(dict(model.named_buffers()))
        modes = [m.training for m in model.modules()]
        rng = torch.get_rng_state()
        syn.end_task(task(x, y, 4))
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
        assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
        assert [m.training for m in model.modules()] == modes
        assert torch.equal(torch.get_rng_state(), rng)
        assert all(float(t.sum()) > 0 for t in syn.importance)


def penalised_grads(model, x, y, anchors, importances, strength):
    """The gradient of loss + penalty by plain autograd."""
    model.zero_grad()
    params = [p for p in model.parameters() if p.requires_grad]
    loss = F.cross_entropy(model(x), y)
    total = loss
    for anchor, importance in zip(anchors, importances):
        total = total + quadratic_penalty(params, anchor, importance, strength)
    total.backward()
    return [p.grad.clone() for p in params]


def moved(model, seed=1):
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("make", [lambda m: EWC(m, 7.0, 0.5), lambda m: MAS(m, 3.0)], ids=["ewc", "mas"])
def test_the_penalty_gradient_is_added_exactly(make):
    torch.manual_seed(0)
    model = mlp(num_classes=4, in_features=12)
    model[1].weight.requires_grad_(False)
    syn = make(model)
    x, y = random_task(8, classes=4, features=(12,))
    x = x.view(8, 1, 12)
    for t in range(2):
        syn.end_task(task(x, y, 3))
        moved(model, seed=t)
    anchor, importance = [a.clone() for a in syn.anchor], [w.clone() for w in syn.importance]
    want = penalised_grads(model, x, y, [anchor], [importance], syn._strength)
    model.zero_grad()
    syn.backward(F.cross_entropy(model(x), y), y, input=x)
    assert model[1].weight.grad is None  # frozen: no penalty
    got = [p.grad for p in model.parameters() if p.requires_grad]
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    plain = penalised_grads(model, x, y, [], [], 0.0)
    assert not all(torch.allclose(a, b, rtol=1e-3) for a, b in zip(plain, want))  # the penalty does pull


def test_online_fisher_decays_by_gamma():
    torch.manual_seed(0)
    model = mlp(num_classes=4, in_features=12)
    x, y = random_task(6, classes=4, features=(12,))
    data = task(x.view(6, 1, 12), y, 3)
    once = EWC(copy.deepcopy(model))
    once.end_task(data)
    syn = EWC(model, gamma=0.25)
    syn.end_task(data)
    syn.end_task(data)  # at the same parameters: F <- 0.25 F + F
    for got, f in zip(syn.importance, once.importance):
        assert torch.allclose(got, 1.25 * f)
    mas = MAS(model)
    mas.end_task(data)
    first = [w.clone() for w in mas.importance]
    mas.end_task(data)  # Omega <- Omega + Omega
    assert all(torch.allclose(w, 2 * f) for w, f in zip(mas.importance, first))


def test_mas_running_average_folds_as_its_twin():
    torch.manual_seed(0)
    model = mlp(num_classes=4, in_features=12)
    (x1, y1), (x2, y2) = random_task(6, 0, 4, (1, 12)), random_task(6, 1, 4, (1, 12))
    syn = MAS(model, accumulate="average", alpha=0.25)
    syn.end_task(task(x1, y1, 3))
    alone1 = MAS(copy.deepcopy(model))
    alone1.end_task(task(x1, y1, 3))
    assert all(torch.equal(w, f) for w, f in zip(syn.importance, alone1.importance))  # the first task: its own
    moved(model)
    syn.end_task(task(x2, y2, 3))
    alone2 = MAS(copy.deepcopy(model))
    alone2.end_task(task(x2, y2, 3))
    want = running_average_importance(alone1.importance, alone2.importance, 0.25)
    assert all(torch.allclose(w, f, rtol=1e-6, atol=0) for w, f in zip(syn.importance, want))
    assert not torch.allclose(syn.importance[0], alone1.importance[0] + alone2.importance[0])  # not the sum


def test_separate_mode_is_the_sum_of_one_penalty_per_task():
    torch.manual_seed(0)
    model = mlp(num_classes=4, in_features=12)
    syn = EWC(model, 5.0, mode="separate")
    latest = EWC(model, 5.0, gamma=0.0)  # online with gamma = 0: F_t and theta_t of the latest task only
    per_task = []
    for t in range(3):
        x, y = random_task(6, seed=t, classes=4, features=(12,))
        data = task(x.view(6, 1, 12), y, 3)
        syn.end_task(data)
        latest.end_task(data)
        per_task.append(([a.clone() for a in latest.anchor], [f.clone() for f in latest.importance]))
        moved(model, seed=t)
    x, y = random_task(8, seed=9, classes=4, features=(12,))
    x = x.view(8, 1, 12)
    want = penalised_grads(model, x, y, *zip(*per_task), strength=5.0)
    model.zero_grad()
    syn.backward(F.cross_entropy(model(x), y), y, input=x)
    for p, w in zip(model.parameters(), want):
        assert torch.allclose(p.grad, w, rtol=1e-5, atol=1e-5)
    # ... and the online mode (one anchor) is not that sum.
    online = EWC(model, 5.0)
    online.load_state_dict(latest.state_dict())
    model.zero_grad()
    online.backward(F.cross_entropy(model(x), y), y, input=x)
    assert not all(torch.allclose(p.grad, w, rtol=1e-5, atol=1e-5) for p, w in zip(model.parameters(), want))


@pytest.mark.parametrize("make", [lambda m: EWC(m, mode="separate"), lambda m: MAS(m)], ids=["ewc", "mas"])
def test_state_dict_round_trip(make):
    torch.manual_seed(0)
    model = mlp(num_classes=4, in_features=12)
    syn = make(model)
    x, y = random_task(6, classes=4, features=(12,))
    x = x.view(6, 1, 12)
    syn.end_task(task(x, y, 3))
    moved(model)
    state = copy.deepcopy(syn.state_dict())
    assert {"importance", "anchor", "num_estimates"} <= set(state["state"])
    model.zero_grad()
    syn.backward(F.cross_entropy(model(x), y), y, input=x)
    want = [p.grad.clone() for p in model.parameters()]

    other = make(model)
    other.load_state_dict(state)
    model.zero_grad()
    other.backward(F.cross_entropy(model(x), y), y, input=x)
    assert all(torch.equal(p.grad, w) for p, w in zip(model.parameters(), want))
    assert other.num_tasks_ended == 1 and other.num_estimates == 1


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda m: EWC(m, ewc_lambda=-1.0), "ewc_lambda"),
        (lambda m: EWC(m, ewc_lambda=math.inf), "ewc_lambda"),
        (lambda m: EWC(m, ewc_lambda=math.nan), "ewc_lambda"),
        (lambda m: EWC(m, gamma=1.5), "gamma"),
        (lambda m: EWC(m, gamma=-0.1), "gamma"),
        (lambda m: EWC(m, gamma=math.nan), "gamma"),
        (lambda m: EWC(m, gamma=True), "gamma"),
        (lambda m: EWC(m, mode="per-task"), "mode"),
        (lambda m: EWC(m, gamma=0.5, mode="separate"), "gamma"),
        (lambda m: EWC(m, fisher="exact"), "fisher"),
        (lambda m: MAS(m, mas_lambda=-0.5), "mas_lambda"),
        (lambda m: MAS(m, mas_lambda="1"), "mas_lambda"),
        (lambda m: MAS(m, accumulate="mean"), "accumulate"),
        (lambda m: MAS(m, accumulate="average", alpha=1.5), "alpha"),
        (lambda m: MAS(m, alpha=math.nan), "alpha"),
        (lambda m: MAS(m, alpha=True), "alpha"),
        (lambda m: EWC(m, task_end_batch=0), "task_end_batch"),
        (lambda m: MAS(m, task_end_batch=2.5), "task_end_batch"),
    ],
)
def test_bad_arguments_raise(make, match):
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        make(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model._forward_hooks and not model._forward_pre_hooks


@pytest.mark.parametrize("make", [EWC, MAS])
def test_rejected_task_ends_change_nothing(make):
    torch.manual_seed(0)
    model = mlp(num_classes=4, in_features=12)
    syn = make(model)
    x, y = random_task(6, classes=4, features=(12,))
    x = x.view(6, 1, 12)
    good = task(x, y, 3)
    syn.end_task(good)
    moved(model)
    before = copy.deepcopy(syn.state_dict())
    with pytest.raises(ValueError, match="data"):
        syn.end_task()
    with pytest.raises(ValueError, match="no samples"):
        syn.end_task([])
    with pytest.raises(TypeError, match="targets, "):
        syn.end_task([good[0], (y, x)])  # the second batch is malformed: found mid-pass
    with pytest.raises(ValueError, match="batch size"):
        syn.end_task([good[0], (y[:2], {"input": x})])
    if make is EWC:
        with pytest.raises(ValueError, match="class indices"):
            syn.end_task([good[0], (y + 4, {"input": x})])  # labels beyond the model's 4 outputs
    assert all(m.training for m in model.modules())
    after = syn.state_dict()
    assert after["num_tasks_ended"] == before["num_tasks_ended"] == 1
    for k in ("importance", "anchor"):
        assert torch.equal(after["state"][k], before["state"][k])


def test_ewc_needs_logits():
    model = nn.Sequential(nn.Linear(3, 4), nn.Unflatten(1, (2, 2)))
    with pytest.raises(ValueError, match="logits"):
        EWC(model).end_task(task(torch.randn(4, 3), torch.zeros(4, dtype=torch.long)))
    MAS(model).end_task(task(torch.randn(4, 3), torch.zeros(4, dtype=torch.long)))  # any output shape


def test_the_penalty_holds_the_weights_of_the_last_task():
    torch.manual_seed(0)
    x1, y1 = random_task(16, seed=1, classes=4, features=(12,))
    x2, y2 = random_task(16, seed=2, classes=4, features=(12,))
    drift = {}
    for strength in (0.0, 50.0):
        torch.manual_seed(0)
        model = mlp(num_classes=4, in_features=12)
        syn = EWC(model, strength)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        syn.end_task(task(x1.view(16, 1, 12), y1, 8))
        start = [p.detach().clone() for p in model.parameters()]
        for _ in range(10):
            loss = F.cross_entropy(model(x2.view(16, 1, 12)), y2)
            opt.zero_grad()
            syn.backward(loss, y2, input=x2.view(16, 1, 12))
            opt.step()
        weighted = sum(
            (w * (p.detach() - s).square()).sum() for w, p, s in zip(syn.importance, model.parameters(), start)
        )
        drift[strength] = float(weighted)
    assert drift[50.0] < 0.5 * drift[0.0]


@pytest.mark.parametrize("name", ["ewc", "mas"])
def test_catalog_methods_run_in_a_plain_loop(name):
    torch.manual_seed(0)
    model = mlp()
    syn = catalog.get(name).create(model, buffer_size=40, buffer_sample_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.03)
    seen = []
    for step in range(20):
        x, y = random_task(8, seed=step)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        syn.backward(loss, y, input=x)
        opt.step()
        seen.append((y, {"input": x}))
        if (step + 1) % 10 == 0:
            syn.end_task(seen)
            seen = []
    assert syn.num_tasks_ended == 2 and all(torch.isfinite(p).all() for p in model.parameters())
