"""GDumb: the stream adds no gradient, the memory stays class-balanced, and the model is retrained from
scratch on the memory alone (its schedule, loss and clipping checked by hand)."""

import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import FASHION_MNIST_DIR, mlp
from synapse import catalog
from synapse.experiments.cli import main
from synapse.rehearsal import GDumb
from synapse.rehearsal.gdumb import cutmix, gdumb_learning_rate


@pytest.fixture(autouse=True)
def _one_thread():
    # Retraining is many tiny steps: on a shared machine a second thread only adds contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blobs(n, classes=4, seed=0):
    """``n`` points of ``classes`` well-separated 2-d blobs (centres on a circle of radius 3)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    angle = 2 * math.pi * y.float() / classes
    centres = torch.stack([angle.cos(), angle.sin()], 1) * 3
    return centres + 0.3 * torch.randn(n, 2, generator=g), y


def small_net(classes=4):
    return nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, classes))


def stream(model, syn, batches, opt=None, zero_grad=True):
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        if opt is not None and zero_grad:
            opt.zero_grad()
        syn.backward(loss, y, input=x)
        if opt is not None:
            opt.step()


def blob_batches(num, size=8, seed=0, classes=4):
    x, y = blobs(num * size, classes, seed)
    return list(zip(x.split(size), y.split(size)))


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a, b))


# ---------------------------------------------------------------------------------------------- schedule
def test_learning_rate_schedule_by_hand():
    hi, lo = 0.05, 0.0005
    # warm-up epoch, max, then SGDR (T_0=1, T_mult=2) stepped from epoch 2: cycles of 1, 2, 4, ... epochs
    cos45 = (1 + math.sqrt(0.5)) / 2  # (1 + cos(pi/4)) / 2
    expected = {
        0: 0.005,
        1: 0.05,
        2: 0.05,  # step 1: the first cycle (length 1) restarts
        3: 0.02525,  # step 2: halfway through the cycle of 2
        4: 0.05,  # step 3: restart, a cycle of 4
        5: lo + (hi - lo) * cos45,  # 0.0427509
        6: 0.02525,
        8: 0.05,  # step 7: restart, a cycle of 8
    }
    for epoch, lr in expected.items():
        assert gdumb_learning_rate(epoch, hi, lo) == pytest.approx(lr, rel=1e-12), epoch
    assert gdumb_learning_rate(5, hi, lo) == pytest.approx(0.04275089, abs=1e-8)
    with pytest.raises(ValueError, match="epoch"):
        gdumb_learning_rate(-1, hi, lo)


def test_learning_rate_schedule_follows_torch_sgdr_as_the_authors_step_it():
    # The authors set epochs 0 and 1 by hand and call CosineAnnealingWarmRestarts.step() from epoch 2 on.
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=1, T_mult=2, eta_min=0.0005)
    for epoch in range(128):
        if epoch == 0:
            opt.param_groups[0]["lr"] = 0.005
        elif epoch == 1:
            opt.param_groups[0]["lr"] = 0.05
        else:
            sched.step()
        assert gdumb_learning_rate(epoch, 0.05, 0.0005) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
    assert gdumb_learning_rate(127, 0.05, 0.0005) < 0.001  # 128 epochs end near the minimum


# ---------------------------------------------------------------------------------------------- the stream
@pytest.mark.parametrize("weight_decay, momentum", [(0.0, 0.0), (5e-4, 0.9)])
def test_stream_steps_change_no_parameter_and_fill_a_balanced_memory(weight_decay, momentum):
    torch.manual_seed(0)
    model = small_net()
    syn = GDumb(model, buffer_size=10, retrain_on_task_end=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=weight_decay, momentum=momentum)
    before = params(model)
    stream(model, syn, blob_batches(12), opt)  # zero_grad() sets None: every optimizer skips the parameters
    assert same(params(model), before)
    assert all(p.grad is None for p in model.parameters())
    counts = syn.buffer.class_counts()
    assert sum(counts.values()) == 10 and set(counts) == {0, 1, 2, 3}
    assert max(counts.values()) - min(counts.values()) <= 1
    assert syn.num_steps == 12 and syn.num_retrains == 0


def test_the_stream_adds_nothing_to_existing_gradients():
    model = small_net()
    syn = GDumb(model, buffer_size=10)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    stream(model, syn, blob_batches(3))
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in model.parameters())


def test_current_loss_user_trains_on_the_stream_as_usual():
    torch.manual_seed(0)
    model = small_net()
    reference = copy.deepcopy(model)
    syn = GDumb(model, buffer_size=10, current_loss="user")
    x, y = blobs(8)
    syn.backward(F.cross_entropy(model(x), y), y, input=x)
    F.cross_entropy(reference(x), y).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad)
    assert len(syn.buffer) == 8


def test_inputs_not_named_as_forward_takes_them_are_refused_at_the_first_step():
    model = small_net()
    syn = GDumb(model, buffer_size=8)
    x, y = blobs(4)
    with pytest.raises(ValueError, match=r"\['x'\] are not parameters of Sequential.forward"):
        syn.backward(F.cross_entropy(model(x), y), y, x=x)
    assert len(syn.buffer) == 0 and syn.num_steps == 0


# ---------------------------------------------------------------------------------------------- retraining
def test_one_full_batch_step_is_the_mean_cross_entropy_with_the_warm_up_rate_by_hand():
    model = nn.Linear(2, 3)
    syn = GDumb(model, buffer_size=4, retrain_lr=1.0, retrain_min_lr=0.0, retrain_weight_decay=0.0)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
    y = torch.tensor([0, 1, 2, 0])
    stream(model, syn, [(x, y)])
    with torch.no_grad():
        model.weight.zero_(), model.bias.zero_()
    syn.retrain(epochs=1, batch_size=4, reinitialize=False, clip_norm=0)
    # Zero weights: softmax 1/3 everywhere, dL/dz_i = (1/3 - onehot(y_i)) / 4. Worked out by hand:
    grad_w = torch.tensor([[-5 / 12, 1 / 6], [1 / 3, -1 / 12], [1 / 12, -1 / 12]])
    grad_b = torch.tensor([-1 / 6, 1 / 12, 1 / 12])
    lr = 0.1  # epoch 0 is the warm-up: a tenth of retrain_lr (momentum's first step is plain SGD)
    assert torch.allclose(model.weight, -lr * grad_w, atol=1e-7)
    assert torch.allclose(model.bias, -lr * grad_b, atol=1e-7)

    # Clipped: the gradient's norm is sqrt(1/3 + 1/24) = sqrt(3/8); clipped to 0.3, the step is 0.1 * 0.3 long.
    with torch.no_grad():
        model.weight.zero_(), model.bias.zero_()
    syn.retrain(epochs=1, batch_size=4, reinitialize=False, clip_norm=0.3)
    step = torch.cat([model.weight.flatten(), model.bias]).norm()
    assert step.item() == pytest.approx(0.1 * 0.3, rel=1e-5)
    assert torch.allclose(model.weight, -lr * grad_w * 0.3 / math.sqrt(3 / 8), atol=1e-6)


# ---------------------------------------------------------------------------------------------- CutMix
def test_cutmix_pastes_one_box_from_the_partner_and_lam_is_the_share_kept():
    import numpy as np

    images = torch.arange(6 * 2 * 7 * 9.0).view(6, 2, 7, 9)  # every pixel distinct
    applied = 0
    for seed in range(40):
        mixed, partner, lam = cutmix(images, 1.0, np.random.default_rng(seed), torch.Generator().manual_seed(seed))
        assert torch.equal(images, torch.arange(6 * 2 * 7 * 9.0).view(6, 2, 7, 9))  # not modified
        if lam == 1.0:
            assert torch.equal(mixed, images)
            continue
        applied += 1
        assert sorted(partner.tolist()) == list(range(6))
        for i in range(6):
            changed = (mixed[i] != images[i]).any(0)  # (H, W): the box, unless the partner is the image itself
            if partner[i] == i:
                assert not changed.any()
                continue
            rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
            box = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
            assert changed[box].all() and changed.sum() == (1 - lam) * 7 * 9  # one full box, lam = share kept
            assert torch.equal(mixed[i][:, box[0], box[1]], images[partner[i]][:, box[0], box[1]])
    assert 10 < applied < 30  # half of the batches


def test_a_retraining_step_with_cutmix_is_the_mixed_cross_entropy():
    import numpy as np

    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    syn = GDumb(model, buffer_size=6, retrain_lr=1.0, retrain_min_lr=0.0, retrain_weight_decay=0.0, retrain_cutmix=1.0)
    x, y = torch.randn(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    stream(model, syn, [(x, y)])
    syn.buffer.flush()
    stored = syn.buffer.stored()
    lams = []
    for _ in range(4):  # the coin may skip CutMix: each retraining is checked, and one must have applied it
        reference = copy.deepcopy(model)
        g = torch.Generator()
        g.set_state(syn._generator.get_state())
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=g)))
        order = torch.randperm(6, generator=g)
        mixed, partner, lam = cutmix(stored["input:input"][order], 1.0, rng, g)
        targets = stored["targets"][order].long()
        out = reference(mixed)
        loss = lam * F.cross_entropy(out, targets) + (1 - lam) * F.cross_entropy(out, targets[partner])
        loss.backward()
        syn.retrain(epochs=1, batch_size=6, reinitialize=False, clip_norm=0)
        for p, q in zip(model.parameters(), reference.parameters()):
            assert torch.allclose(p, q.detach() - 0.1 * q.grad, atol=1e-6)  # warm-up epoch: lr 0.1
        lams.append(lam)
    assert min(lams) < 1.0


def test_cutmix_on_inputs_that_are_not_images_is_refused_before_any_change():
    torch.manual_seed(0)
    model = small_net()
    syn = GDumb(model, buffer_size=16, retrain_cutmix=1.0)
    stream(model, syn, blob_batches(2))
    before, state = params(model), copy.deepcopy(syn.state_dict())
    with pytest.raises(ValueError, match="retrain_cutmix needs one model input of images"):
        syn.retrain()
    assert same(params(model), before) and syn.num_retrains == 0
    assert torch.equal(syn.state_dict()["state"]["retrain_rng"], state["state"]["retrain_rng"])


def test_retrain_reinitialises_from_scratch():
    torch.manual_seed(0)
    model = small_net()
    syn = GDumb(model, buffer_size=16)
    stream(model, syn, blob_batches(2))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(5.0)
    frozen = lambda ps: torch.optim.SGD(ps, lr=0.0)  # noqa: E731  (no training: only the re-initialisation)
    syn.retrain(epochs=1, optimizer_factory=frozen, reinitialize=False)
    assert all(torch.equal(p, torch.full_like(p, 5.0)) for p in model.parameters())
    syn.retrain(epochs=1, optimizer_factory=frozen)
    for layer in (model[0], model[2]):  # PyTorch's default: uniform within 1/sqrt(fan_in)
        bound = 1 / math.sqrt(layer.in_features)
        for p in (layer.weight, layer.bias):
            assert p.abs().max() <= bound and p.std() > bound / 4
    calls = []
    syn.retrain(
        epochs=1, optimizer_factory=frozen, reinitialize=lambda m: calls.append(m) or nn.init.zeros_(m[2].weight)
    )
    assert calls == [model] and torch.equal(model[2].weight, torch.zeros_like(model[2].weight))
    syn.reinitialize = False  # the constructor's setting is the default of retrain() and end_task()
    with torch.no_grad():
        model[0].weight.fill_(5.0)
    syn.retrain(epochs=1, optimizer_factory=frozen)
    assert torch.equal(model[0].weight, torch.full_like(model[0].weight, 5.0))


def test_retrain_fits_the_memory_and_is_deterministic_given_the_seed():
    results = []
    for _ in range(2):
        torch.manual_seed(3)
        model = small_net()
        syn = GDumb(model, buffer_size=40, retrain_epochs=16)
        stream(model, syn, blob_batches(10))
        items = syn.buffer.stored()
        x, y = items["input:input"], items["targets"]
        with torch.no_grad():
            before = (model(x).argmax(1) == y).float().mean().item()
        rng = torch.get_rng_state()
        syn.end_task()  # retrains with the constructor's settings
        assert syn.num_retrains == 1
        assert torch.equal(torch.get_rng_state(), rng)  # GDumb's own generator, not torch's
        with torch.no_grad():
            after = (model(x).argmax(1) == y).float().mean().item()
        assert before < 0.6 and after == 1.0  # measured: 0.375 and 1.0
        assert all(p.grad is None for p in model.parameters()) and model.training
        results.append(params(model))
    assert same(*results)


def test_retrain_with_your_own_optimizer_and_scheduler():
    torch.manual_seed(0)
    model = small_net()
    syn = GDumb(model, buffer_size=32)
    stream(model, syn, blob_batches(4))
    got, lrs = [], []

    class Recording(torch.optim.Adam):
        def step(self, closure=None):
            lrs.append(self.param_groups[0]["lr"])
            return super().step(closure)

    def factory(ps):
        got.append(list(ps))
        return Recording(got[0], lr=0.02)

    model.eval()
    schedulers = []

    def scheduler_factory(opt):
        schedulers.append(torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
        return schedulers[0]

    loss = syn.retrain(epochs=3, batch_size=8, optimizer_factory=factory, scheduler_factory=scheduler_factory)
    assert [id(p) for p in got[0]] == [id(p) for p in model.parameters()]
    assert lrs == [0.02] * 4 + [0.01] * 4 + [0.005] * 4  # 32 items / 8 per batch, the scheduler once per epoch
    assert schedulers[0].last_epoch == 3
    assert not model.training and loss is not None and loss < 1.0

    # Without a scheduler: the paper's schedule over the optimizer's own rate, down to min_lr.
    lrs.clear()
    syn.retrain(epochs=4, batch_size=32, optimizer_factory=factory, min_lr=0.001)
    assert lrs == pytest.approx([gdumb_learning_rate(e, 0.02, 0.001) for e in range(4)])


def test_every_epoch_is_a_fresh_random_order_of_the_whole_memory():
    torch.manual_seed(0)
    model = small_net()
    syn = GDumb(model, buffer_size=12)
    stream(model, syn, blob_batches(2, size=6))
    seen = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["input"][:, 0].clone()), with_kwargs=True
    )
    syn.retrain(epochs=3, batch_size=5)  # batches of 5, 5 and 2
    stored = syn.buffer.stored()["input:input"][:, 0]
    assert [len(b) for b in seen] == [5, 5, 2] * 3
    epochs = [torch.cat(seen[i : i + 3]) for i in (0, 3, 6)]
    for order in epochs:
        assert torch.equal(order.sort().values, stored.sort().values)  # each item once per epoch
    assert not torch.equal(epochs[0], stored) and not torch.equal(epochs[0], epochs[1])


def test_an_empty_memory_retrains_nothing():
    model = small_net()
    before = params(model)
    syn = GDumb(model, buffer_size=8)
    assert syn.retrain() is None
    syn.end_task()
    assert same(params(model), before) and syn.num_retrains == 0 and syn.num_tasks_ended == 1


def test_modules_without_reset_parameters_are_named_and_kept():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.full((4,), 3.0))

        def forward(self, z):
            return z * self.gain

    model = nn.Sequential(nn.Linear(2, 4), Scale())
    syn = GDumb(model, buffer_size=8)
    stream(model, syn, blob_batches(1))
    with pytest.warns(UserWarning, match=r"1\.gain"):
        syn.retrain(epochs=1, optimizer_factory=lambda ps: torch.optim.SGD(ps, lr=0.0))
    assert torch.equal(model[1].gain, torch.full((4,), 3.0))


def test_retrain_on_task_end_false_leaves_it_to_you():
    model = small_net()
    syn = GDumb(model, buffer_size=16, retrain_on_task_end=False)
    stream(model, syn, blob_batches(2))
    before = params(model)
    syn.end_task(data=[(torch.zeros(2, dtype=torch.long), {"input": torch.zeros(2, 2)})])  # data is not needed
    assert same(params(model), before) and syn.num_retrains == 0


# ---------------------------------------------------------------------------------------------- state
def test_a_bad_state_dict_changes_nothing():
    model = small_net()
    syn = GDumb(model, buffer_size=8)
    stream(model, syn, blob_batches(1))
    state = syn.state_dict()
    bad = copy.deepcopy(state)
    bad["state"]["retrain_rng"] = torch.zeros(3)
    with pytest.raises(ValueError, match="retrain_rng"):
        syn.load_state_dict(bad)
    assert torch.equal(syn.state_dict()["state"]["retrain_rng"], state["state"]["retrain_rng"])


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs",
    [
        # (each catalog hyperparameter's own range is the contract's: tests/test_contract.py)
        {"retrain_min_lr": 0.1, "retrain_lr": 0.05},
        {"retrain_on_task_end": 1},
        {"reinitialize": "yes"},
        {"retrain_cutmix": -1.0},
    ],
)
def test_bad_constructor_arguments_are_rejected(kwargs):
    model = small_net()
    before = params(model)
    with pytest.raises((TypeError, ValueError)):
        GDumb(model, **kwargs)
    assert same(params(model), before)


def test_bad_retrain_arguments_change_nothing():
    torch.manual_seed(0)
    model = small_net()
    syn = GDumb(model, buffer_size=16)
    stream(model, syn, blob_batches(2))
    before, state = params(model), copy.deepcopy(syn.state_dict())
    bad_calls = [
        dict(epochs=0),
        dict(batch_size=-2),
        dict(min_lr=float("nan")),
        dict(clip_norm=-1.0),
        dict(optimizer_factory=3),
        dict(optimizer_factory=lambda ps: "not an optimizer"),
        dict(scheduler_factory=lambda opt: object()),
        dict(reinitialize="yes"),
    ]
    for kwargs in bad_calls:
        with pytest.raises((TypeError, ValueError)):
            syn.retrain(**kwargs)
        assert same(params(model), before)
        assert torch.equal(syn.state_dict()["state"]["retrain_rng"], state["state"]["retrain_rng"])
        assert syn.num_retrains == 0 and len(syn.buffer) == 16


# ---------------------------------------------------------------------------------------------- catalog, CLI
def test_catalog_entry_and_the_platform_schedule():
    spec = catalog.get("gdumb")
    assert spec.cls is GDumb and spec.family == "rehearsal" and not spec.task_free
    defaults = spec.defaults()
    assert defaults["retrain_epochs"] == 128 and defaults["retrain_lr"] == 0.05 and defaults["retrain_batch_size"] == 16
    torch.manual_seed(0)
    model = mlp()
    syn = spec.create(model, buffer_size=40, buffer_sample_size=8)
    assert syn.buffer_policy == "class_balanced" and syn.retrain_epochs == 128
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(20)]
    for i, (x, y) in enumerate(data):
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        syn.backward(loss, y, input=x)
        opt.step()
        if (i + 1) % 10 == 0:
            syn.end_task([(yy, {"input": xx}) for xx, yy in data[i - 9 : i + 1]])
    assert syn.num_retrains == 2 and len(syn.buffer) == 40
    items = syn.buffer.stored()
    with torch.no_grad():
        fitted = (model(items["input:input"]).argmax(1) == items["targets"]).float().mean().item()
    assert fitted == 1.0  # 128 epochs memorise 40 random images


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="needs dataset-fashion-mnist")
def test_cli_runs_gdumb(tmp_path):
    args = ["--dataset", "fashion-mnist", "--max_train_per_task", "100", "--max_test_per_task", "50", "--quiet"]
    args += ["--output_dir", str(tmp_path), "--synapse_type", "gdumb", "--buffer_size", "50", "--retrain_epochs", "8"]
    assert main(args) == 0
    with open(tmp_path / "results.json") as f:
        r = json.load(f)
    assert r["config"]["method_args"]["retrain_epochs"] == 8 and r["predictor"] == "model"
    class_il = r["accuracy_matrix"]["class_il"]
    assert len(class_il) == 5
    # Retrained at every task end on the memory alone: the classes it holds are learnt, later ones unseen.
    for t, row in enumerate(class_il):
        assert all(a == 0.0 for a in row[t + 1 :])
    assert class_il[0][0] > 0.8  # measured: 0.96 (two classes, 50 images)


# ---------------------------------------------------------------------------- the experiment program
@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="needs dataset-fashion-mnist")
@pytest.mark.parametrize("init", ["xavier", "default"])
def test_the_experiment_program_retrains_from_its_own_initialisation(init):
    """The program's GDumb re-initialises the network as the program built it: Glorot-uniform weights and
    zero biases on the Xavier-initialised MLP (as the DER authors' port, which builds a fresh backbone), and
    PyTorch's defaults otherwise."""
    from synapse.experiments.run import Config, Experiment

    cfg = Config(
        dataset="fashion-mnist",
        model="mlp",
        init=init,
        synapse_type="gdumb",
        buffer_size=20,
        max_train_per_task=10,
        max_test_per_task=5,
        threads=1,
        quiet=True,
    )
    method = Experiment(cfg).synapse
    assert isinstance(method, GDumb)
    if init == "default":
        assert method.reinitialize is True
        return
    linears = [m for m in method.module.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for layer in linears:
            layer.weight.fill_(5.0)
            layer.bias.fill_(5.0)
    method.reinitialize(method.module)
    for layer in linears:
        bound = (6.0 / (layer.in_features + layer.out_features)) ** 0.5
        weight = layer.weight.detach()
        assert float(weight.abs().max()) <= bound and float(weight.std()) > bound / 4
        assert bool((layer.bias == 0).all())
