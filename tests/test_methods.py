import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import batches, mlp, train
from synapse.gradient import AGEM
from synapse.rehearsal import ER
from synapse.structure import SI

ALL_METHODS = {
    "er": lambda m: ER(m, 40, 8, method="er"),
    "der": lambda m: ER(m, 40, 8, method="der"),
    "der++": lambda m: ER(m, 40, 8, alpha=0.5, beta=0.5),
    "der++ unfused": lambda m: ER(m, 40, 8, alpha=0.5, beta=0.5, fused=False),
    "custom": lambda m: ER(m, 40, 8, method="custom", custom_loss_fn=lambda z, pz, py: F.mse_loss(z, pz)),
    "agem": lambda m: AGEM(m, 40, 8),
    "si": lambda m: SI(m, checkpoint_per_steps=7),
}


def test_fused_and_unfused_replay_give_the_same_gradient():
    # Without BatchNorm the fused forward is the same computation as a separate one.
    for method in ("er", "der", "der++"):
        grads = []
        for fused in (True, False):
            torch.manual_seed(0)
            model = mlp()
            syn = ER(model, 30, 6, alpha=0.7, beta=0.3, method=method, fused=fused)
            train(model, syn, batches(6))
            x, y = batches(1, seed=7)[0]
            out = model(x)
            assert out.shape == (8, 10)  # the user sees their own batch only
            model.zero_grad()
            syn.backward(F.cross_entropy(out, y), y, input=x)
            grads.append([p.grad.clone() for p in model.parameters()])
        for a, b in zip(*grads):
            assert torch.allclose(a, b, atol=1e-6), method


def test_der_stores_the_users_own_logits_without_an_extra_forward():
    model = mlp()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    syn = ER(model, 100, 4, method="der")
    x, y = batches(1)[0]
    out = model(x)
    syn.backward(F.cross_entropy(out, y), y, input=x)
    assert calls == [8]  # the buffer was empty: no replay, and no second forward to get the logits
    stored = syn.buffer.state_dict()["storage"]["logits"][:8]
    assert torch.equal(stored, out.detach())
    out2 = model(x)  # now replay rides along in the same forward
    assert calls == [8, 12] and out2.shape == (8, 10)


def test_replay_loss_is_added():
    torch.manual_seed(0)
    model = mlp()
    syn = ER(model, 30, 6, alpha=1.0, method="er")
    train(model, syn, batches(4))
    x, y = batches(1, seed=3)[0]
    model.zero_grad()
    syn.backward(F.cross_entropy(model(x), y), y, input=x)
    with_replay = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    F.cross_entropy(model.eval()(x), y).backward()  # eval: no replay
    plain = [p.grad.clone() for p in model.train().parameters()]
    assert any(not torch.allclose(a, b) for a, b in zip(with_replay, plain))


def test_eval_mode_and_no_grad_forwards_are_untouched():
    model = mlp()
    syn = ER(model, 30, 6)
    train(model, syn, batches(3))
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert model(x).shape == (5, 10)
    model.eval()
    assert model(x).shape == (5, 10)
    model.train()


def test_growing_head_keeps_working_and_masks_old_rows():
    class Grow(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU())
            self.head = nn.Linear(32, 2)

        def forward(self, inputs):
            return self.head(self.body(inputs))

        def grow(self, n):
            old = self.head
            self.head = nn.Linear(32, old.out_features + n)
            with torch.no_grad():
                self.head.weight[: old.out_features] = old.weight
                self.head.bias[: old.out_features] = old.bias

    model = Grow()
    syn = ER(model, 50, 8, method="der++")
    for stage in range(3):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for x, y in batches(5, seed=stage):
            y = y % model.head.out_features
            loss = F.cross_entropy(model(inputs=x), y)
            opt.zero_grad()
            syn.backward(loss, y, inputs=x)
            opt.step()
            assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        model.grow(2)
    stored = syn.buffer.state_dict()["storage"]
    assert stored["logits"].shape[1] == 6
    assert set(stored["logit_width"].tolist()) == {2, 4, 6}


def test_agem_applies_the_projected_gradient():
    torch.manual_seed(0)
    model = mlp()
    syn = AGEM(model, 50, 16)
    train(model, syn, batches(8))
    x, y = batches(1, seed=5)[0]
    snapshot = copy.deepcopy(model)
    model.zero_grad()
    syn.backward(F.cross_entropy(model(x), y), y, input=x)
    applied = torch.cat([p.grad.flatten() for p in model.parameters()])

    # Recompute by hand from the reference minibatch it drew.
    sample = syn.last_replay
    assert sample["targets"].shape == (16,)
    ref_loss = F.cross_entropy(snapshot(sample["input:input"]), sample["targets"])
    r = torch.cat([g.flatten() for g in torch.autograd.grad(ref_loss, list(snapshot.parameters()))])
    g = torch.cat(
        [gg.flatten() for gg in torch.autograd.grad(F.cross_entropy(snapshot(x), y), list(snapshot.parameters()))]
    )
    expected = g - min(torch.dot(g, r).item(), 0.0) / torch.dot(r, r).item() * r
    assert torch.allclose(applied, expected, atol=1e-5)
    assert torch.dot(applied, r).item() >= -1e-4


def test_si_path_integral_and_penalty_match_the_paper():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    lr, alpha, xi = 0.1, 0.7, 0.5
    syn = SI(model, alpha=alpha, xi=xi, checkpoint_per_steps=10_000)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    start = [p.detach().clone() for p in model.parameters()]
    omega = [torch.zeros_like(p) for p in model.parameters()]
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    for _step in range(5):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        syn.backward(loss, y, input=x)
        before = [p.detach().clone() for p in model.parameters()]
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        for o, g, b, p in zip(omega, grads, before, model.parameters()):
            o -= g * (p.detach() - b)
    syn.end_task()
    expected = [o / ((p.detach() - s) ** 2 + xi) for o, p, s in zip(omega, model.parameters(), start)]
    for got, want in zip(syn.importance, expected):
        assert torch.allclose(got, want, atol=1e-6)

    # After consolidation the gradient includes 2 * alpha * Omega * (theta - theta*).
    anchor = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3)
    model.zero_grad()
    loss = F.cross_entropy(model(x), y)
    syn.backward(loss, y, input=x)
    model2 = copy.deepcopy(model)
    model2.zero_grad()
    penalty = sum((om * (p - a) ** 2).sum() for om, p, a in zip(expected, model2.parameters(), anchor))
    (F.cross_entropy(model2(x), y) + alpha * penalty).backward()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)


def test_si_consolidates_every_checkpoint_per_steps():
    model = mlp()
    syn = SI(model, checkpoint_per_steps=4)
    train(model, syn, batches(9))
    assert syn.num_consolidations == 2


def test_several_named_inputs():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

        def forward(self, image, meta):
            return self.a(image) + self.b(meta)

    for fused in (True, False):
        model = TwoInputs()
        syn = ER(model, 20, 4, method="der++", fused=fused)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(6):
            img, meta, y = torch.randn(5, 4), torch.randn(5, 2), torch.randint(0, 3, (5,))
            out = model(img, meta=meta)
            assert out.shape == (5, 3)
            opt.zero_grad()
            syn.backward(F.cross_entropy(out, y), y, image=img, meta=meta)
            opt.step()
        assert syn.buffer.schema()["input:meta"] == ((2,), torch.float32)


def test_non_finite_loss_never_reaches_stored_logits():
    model = mlp()
    syn = ER(model, 16, 4, method="der")
    for step in range(6):
        x, y = batches(1, seed=step)[0]
        out = model(x)
        if step == 2:
            out = out * float("inf")
            syn._forward.outputs = out  # as if the model itself had diverged
        loss = F.cross_entropy(out, y)
        model.zero_grad()
        syn.backward(loss, y, input=x)
    assert torch.isfinite(syn.buffer.state_dict()["storage"]["logits"]).all()


def test_autocast_with_grad_scaler_on_cpu():
    torch.manual_seed(0)
    model = mlp()
    scaler = torch.amp.GradScaler("cpu")
    for make in (
        lambda m: ER(m, 30, 6, scaler=scaler),
        lambda m: AGEM(m, 30, 6, scaler=scaler),
        lambda m: SI(m, checkpoint_per_steps=3, scaler=scaler),
    ):
        syn = make(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for x, y in batches(6):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            syn.backward(loss, y, input=x)
            scaler.step(opt)
            scaler.update()
        assert all(torch.isfinite(p).all() for p in model.parameters())
        if isinstance(syn, ER):
            syn.remove_hooks()


@pytest.mark.parametrize("method", ["er", "der", "der++"])
def test_grad_scaler_scales_every_replay_term_alike(method):
    # A power-of-two scale is exact in floating point: scaled training, unscaled by the scaler before each
    # step, must follow the unscaled run. A replay term left unscaled would be divided by 1024 instead.
    params = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=10**6)):
        torch.manual_seed(0)
        model = mlp()
        syn = ER(model, 20, 6, alpha=0.5, method=method, scaler=scaler)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for x, y in batches(12):
            opt.zero_grad()
            syn.backward(F.cross_entropy(model(x), y), y, input=x)
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(params[0], params[1], rtol=1e-6, atol=1e-7)


def test_state_follows_the_model_to_another_device_in_the_state_dict():
    # CPU -> CPU through map_location-like moves; CUDA is covered by the gpu tests.
    model = mlp()
    syn = ER(model, 20, 4)
    train(model, syn, batches(4))
    state = syn.state_dict()
    assert state["state"]["buffer"]["storage"]["logits"].device.type == "cpu"


@pytest.mark.slow
def test_torch_compiled_model():
    torch.manual_seed(0)
    model = mlp()
    compiled = torch.compile(model)
    syn = ER(compiled, 30, 6, method="der++")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for x, y in batches(6):
        out = compiled(x)
        assert out.shape == (8, 10)
        opt.zero_grad()
        syn.backward(F.cross_entropy(out, y), y, input=x)
        opt.step()
    assert len(syn.buffer) == 30


def live_tensors():
    import gc
    import warnings

    gc.collect()
    with warnings.catch_warnings():  # isinstance() on deprecated module attributes warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.parametrize("name", ["der++", "der++ unfused", "agem", "si"])
def test_nothing_accumulates_over_a_thousand_steps(name):
    model = mlp()
    syn = ALL_METHODS[name](model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = batches(10)
    train(model, syn, data * 10)  # the buffer is full
    before_tensors = live_tensors()
    before_bytes = sum(t.nbytes for t in _tensors_in(syn.state_dict()))
    train(model, syn, data * 100)
    assert live_tensors() <= before_tensors
    assert sum(t.nbytes for t in _tensors_in(syn.state_dict())) == before_bytes
    del opt


def _tensors_in(state):
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for v in state.values():
            yield from _tensors_in(v)
    elif isinstance(state, (list, tuple)):
        for v in state:
            yield from _tensors_in(v)


def test_bf16_logits_halve_their_memory_and_still_learn():
    model = mlp()
    syn = ER(model, 50, 8, method="der", logits_dtype=torch.bfloat16)
    train(model, syn, batches(10))
    assert syn.buffer.schema()["logits"][1] == torch.bfloat16
    assert syn.buffer.bytes_per_item == 784 * 4 + 10 * 2  # inputs and bf16 logits: DER stores no targets
    x, y = batches(1, seed=3)[0]
    model.zero_grad()
    syn.backward(F.cross_entropy(model(x), y), y, input=x)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_a_forward_without_backward_does_not_poison_the_next_step():
    model = mlp()
    syn = ER(model, 30, 6, method="der++")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    train(model, syn, batches(5))
    x, y = batches(1, seed=9)[0]
    model(x)  # replay rode along, but this step is abandoned...
    opt.step()  # ...and the parameters move on
    out = model(x)
    assert out.shape == (8, 10)
    opt.zero_grad()
    syn.backward(F.cross_entropy(out, y), y, input=x)  # uses this forward's replay, not the stale one
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
