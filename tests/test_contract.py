"""The contract every registered method keeps, run against the whole catalog (no hand-kept lists).

A method added to the catalog is picked up here automatically: bit-identical resume, a rejected input
that changes nothing, a task-end pass in the documented form, a short learning check, and the
catalog's own promises (hyperparameters parse, the README lists the method).
"""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import mlp
from synapse import catalog, named_batches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = catalog.names()
STEPS, TASK_LENGTH = 16, 8


def batches(n, batch=8, seed=0, classes=10):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 1, 28, 28, generator=g), torch.randint(0, classes, (batch,), generator=g)) for _ in range(n)
    ]


def build(name, model):
    return catalog.get(name).create(model, buffer_size=40, buffer_sample_size=8)


def task_data(data):
    return [(y, {"input": x}) for x, y in data]


def train(model, syn, data, start=0, lr=0.05, opt=None):
    """Steps ``start..`` of the schedule: a task ends every TASK_LENGTH steps, with its data passed."""
    opt = opt or torch.optim.SGD(model.parameters(), lr=lr)
    for i, (x, y) in enumerate(data[start:], start):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        syn.backward(loss, y, input=x)
        opt.step()
        if (i + 1) % TASK_LENGTH == 0:
            syn.end_task(task_data(data[i + 1 - TASK_LENGTH : i + 1]))
    return opt


def state_equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", NAMES)
def test_resume_is_bit_identical(name):
    data = batches(STEPS + 4)
    torch.manual_seed(1)
    model = mlp()
    syn = build(name, model)
    resume_at = TASK_LENGTH + 3  # mid-task, after one task end
    opt = train(model, syn, data[:resume_at])
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), syn.state_dict()))
    train(model, syn, data, start=resume_at, opt=opt)

    torch.manual_seed(99)  # another process: other init and seeds, all overwritten by the loads
    resumed = mlp()
    resumed.load_state_dict(saved[0])
    syn2 = build(name, resumed)
    syn2.load_state_dict(saved[2])
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.05)
    opt2.load_state_dict(saved[1])
    train(resumed, syn2, data, start=resume_at, opt=opt2)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert state_equal(syn.state_dict(), syn2.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_a_rejected_backward_changes_nothing(name):
    data = batches(TASK_LENGTH + 2)
    model = mlp()
    syn = build(name, model)
    train(model, syn, data)
    x, y = data[0]
    out = model(x)  # a fused replay samples here, in the forward: the snapshot comes after it
    before = copy.deepcopy(syn.state_dict())
    model.zero_grad()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    bad_calls = [
        lambda: syn.backward(F.cross_entropy(out, y), y.float(), input=x),  # float targets
        lambda: syn.backward(F.cross_entropy(out, y), y[:4], input=x),  # batch sizes differ
        lambda: syn.backward(F.cross_entropy(out, y), y),  # no inputs
        lambda: syn.backward(F.cross_entropy(out, y).detach(), y, input=x),  # no graph
    ]
    for call in bad_calls:
        with pytest.raises((TypeError, ValueError)):
            call()
        assert state_equal(syn.state_dict(), before)
        for p, g in zip(model.parameters(), grads):
            assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    # The same object still trains after the rejections.
    syn.backward(F.cross_entropy(model(x), y), y, input=x)


@pytest.mark.parametrize("name", NAMES)
def test_a_rejected_task_end_changes_nothing(name):
    model = mlp()
    syn = build(name, model)
    train(model, syn, batches(3))
    before = copy.deepcopy(syn.state_dict())
    with pytest.raises(TypeError, match="data"):
        syn.end_task(torch.zeros(3))
    if type(syn).needs_task_data:
        with pytest.raises(ValueError, match="data"):
            syn.end_task()
    assert state_equal(syn.state_dict(), before)


@pytest.mark.parametrize("name", NAMES)
def test_task_end_accepts_a_loader_through_named_batches(name):
    model = mlp()
    syn = build(name, model)
    data = batches(4)
    train(model, syn, data)
    syn.end_task(named_batches(data, "input"))
    assert syn.num_tasks_ended == 1


@pytest.mark.parametrize("name", NAMES)
def test_learns_the_current_task(name):
    # Four fixed batches of a 2-class problem whose classes are separable: any method must fit it, by the
    # end of the task (GDumb learns only then, from its memory).
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (4, 8), generator=g)
    x = torch.randn(4, 8, 1, 28, 28, generator=g) * 0.1 + y.view(4, 8, 1, 1, 1).float() * 2 - 1
    torch.manual_seed(0)
    model = mlp()
    syn = build(name, model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def task_loss():
        with torch.no_grad():
            return sum(F.cross_entropy(model(x[i]), y[i]).item() for i in range(4))

    before = task_loss()
    for i in range(24):
        xb, yb = x[i % 4], y[i % 4]
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        syn.backward(loss, yb, input=xb)
        opt.step()
    syn.end_task([(y[i], {"input": x[i]}) for i in range(4)])
    assert task_loss() < 0.5 * before


@pytest.mark.parametrize("spec", catalog.specs(), ids=NAMES)
def test_catalog_entry_is_complete(spec):
    assert spec.paper and spec.summary and spec.family in catalog.FAMILIES
    assert spec.cls.__doc__ and spec.paper.split(",")[0].split()[0] in spec.cls.__doc__  # the paper is cited
    defaults = spec.resolve({})
    for h in spec.hparams:
        assert h.parse(str(h.default)) == defaults[h.name]  # the CLI's text form round-trips
    with pytest.raises(ValueError, match="no hyperparameter"):
        spec.resolve({"not_a_parameter": 1})


def test_readme_methods_table_lists_the_catalog():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    start, end = readme.index("<!-- methods:start -->"), readme.index("<!-- methods:end -->")
    from synapse.catalog import methods_table

    assert readme[start:end].split("\n", 1)[1].strip() == methods_table().strip()
