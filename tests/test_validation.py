import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import mlp
from synapse.gradient import AGEM
from synapse.rehearsal import ER
from synapse.structure import SI


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda m: ER(m, buffer_size=0), "buffer_size"),
        (lambda m: ER(m, buffer_size=-5), "buffer_size"),
        (lambda m: ER(m, buffer_sample_size=0), "buffer_sample_size"),
        (lambda m: ER(m, alpha=-0.1), "alpha"),
        (lambda m: ER(m, beta=-1), "beta"),
        (lambda m: ER(m, alpha=float("nan")), "alpha"),
        (lambda m: ER(m, method="derpp"), "method"),
        (lambda m: ER(m, method="custom"), "custom_loss_fn"),
        (lambda m: ER(m, method="er", custom_loss_fn=lambda *a: 0), "custom_loss_fn"),
        (lambda m: AGEM(m, buffer_size=0), "buffer_size"),
        (lambda m: ER(m, buffer_scope="node"), "buffer_scope"),
        (lambda m: AGEM(m, buffer_sample_size=-1), "buffer_sample_size"),
        (lambda m: SI(m, xi=-0.1), "xi"),
        (lambda m: SI(m, alpha=-1), "alpha"),
        (lambda m: SI(m, model_lr=0), "model_lr"),
        (lambda m: SI(m, checkpoint_per_steps=0), "checkpoint_per_steps"),
    ],
)
def test_constructor_rejects_bad_values_naming_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make(mlp())


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        ER("not a model")


def snapshot(syn):
    return copy.deepcopy(syn.state_dict())


def assert_same_state(a, b):
    def walk(x, y):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
        elif isinstance(x, dict):
            assert x.keys() == y.keys()
            for k in x:
                walk(x[k], y[k])
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y)
            for i, j in zip(x, y):
                walk(i, j)
        else:
            assert x == y

    walk(a, b)


BAD_CALLS = [
    ("targets batch size", lambda m, x, y: (F.cross_entropy(m(x), y), y[:4], {"input": x}), ValueError, "batch size"),
    ("float targets", lambda m, x, y: (F.cross_entropy(m(x), y), y.float(), {"input": x}), TypeError, "integer"),
    ("2-d targets", lambda m, x, y: (F.cross_entropy(m(x), y), y[:, None], {"input": x}), ValueError, "1-d"),
    (
        "non-scalar loss",
        lambda m, x, y: (F.cross_entropy(m(x), y, reduction="none"), y, {"input": x}),
        ValueError,
        "scalar",
    ),
    (
        "loss without grad",
        lambda m, x, y: (F.cross_entropy(m(x), y).detach(), y, {"input": x}),
        ValueError,
        "require grad",
    ),
    ("no inputs", lambda m, x, y: (F.cross_entropy(m(x), y), y, {}), ValueError, "keyword"),
    (
        "input of other shape",
        lambda m, x, y: (F.cross_entropy(m(x), y), y, {"input": x[:, :, :14]}),
        ValueError,
        "shape",
    ),
    ("input of other dtype", lambda m, x, y: (F.cross_entropy(m(x), y), y, {"input": x.double()}), ValueError, "dtype"),
]


@pytest.mark.parametrize(
    "make", [lambda m: ER(m, 20, 4), lambda m: ER(m, 20, 4, fused=False), lambda m: AGEM(m, 20, 4)]
)
@pytest.mark.parametrize("case", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_rejected_call_changes_nothing(make, case):
    _, build, error, match = case
    model = mlp()
    syn = make(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):  # fill the buffer so the schema is known
        x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        syn.backward(loss, y, input=x)
        opt.step()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    loss, targets, inputs = build(model, x, y)  # the forward may draw a fused replay sample: that is not the call
    before = snapshot(syn)
    model.zero_grad()
    with pytest.raises(error, match=match):
        syn.backward(loss, targets, **inputs)
    assert_same_state(before, snapshot(syn))
    assert all(p.grad is None for p in model.parameters()), "a rejected call must not run backward"


def test_si_rejects_bad_calls_without_change():
    model = mlp()
    syn = SI(model, checkpoint_per_steps=2)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    syn.backward(F.cross_entropy(model(x), y), y, input=x)
    loss = F.cross_entropy(model(x), y)
    before = snapshot(syn)
    with pytest.raises(TypeError):
        syn.backward(loss, y.float(), input=x)
    assert_same_state(before, snapshot(syn))


def test_der_without_a_forward_is_a_clear_error():
    model = mlp()
    syn = ER(model, 10, 2, method="der")
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    with torch.no_grad():
        out = model(x)
    loss = F.cross_entropy(out.requires_grad_(), y)
    with pytest.raises(ValueError, match="logits"):
        syn.backward(loss, y, input=x)
    assert len(syn.buffer) == 0


def test_load_state_dict_of_another_method_is_refused():
    er, si = ER(mlp()), SI(mlp())
    with pytest.raises(ValueError, match="SI"):
        er.load_state_dict(si.state_dict())
