"""The traps a first conversion of a user's own loop hits (issue 19): each gets a clear error before any state
changes, or a one-time ``UserWarning`` naming the cause and the fix.

Every error test checks that nothing changed: the state dict (buffers, counters, memories), the gradients
and the model's hooks.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from synapse import catalog, named_batches, testing
from synapse.experiments.cli import main
from synapse.gradient import AGEM
from synapse.pretrained import RanPAC, SimpleCIL
from synapse.rehearsal import ER
from synapse.structure import EWC

NAMES = catalog.names()
LOGIT_READERS = [s.name for s in catalog.specs() if s.cls.reads_logits or s.fixed.get("method") in ("der", "der++")]


def _acts_at_task_end(spec) -> bool:
    """As the method is built with its defaults (L2P acts at task ends only with its default train_mask)."""
    method = spec.create(testing.toy_for(spec).model(), spec.harness_hparams)
    method.remove_hooks()
    return method.acts_at_task_end


TASK_END_METHODS = [s.name for s in catalog.specs() if _acts_at_task_end(s)]


class Net(nn.Module):
    """A tutorial's model: its forward's argument is ``x``, and it may end in ``log_softmax``."""

    def __init__(self, log_probs: bool = False, num_classes: int = 6) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.head = nn.Linear(16, num_classes)
        self.log_probs = log_probs

    def forward(self, x):
        out = self.head(self.body(x))
        return F.log_softmax(out, 1) if self.log_probs else out


def batch(classes, n=8, seed=0, shape=(8,)):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes)[torch.randint(len(classes), (n,), generator=g)]
    return torch.randn(n, *shape, generator=g) + y.float().view(-1, *[1] * len(shape)), y


def tutorial(name):
    """The tutorial's model for method ``name`` and its input shape: Net, or the harness's tiny timm ViT for
    the methods that need one (its forward's argument is ``x`` too)."""
    if catalog.get(name).cls.requires_vit:
        return testing.toy_vit(classes=6), (3, testing.IMAGE_SIZE, testing.IMAGE_SIZE)
    return Net(), (8,)


def step(model, syn, x, y, /, **names):
    """One step of the user's loop; the inputs go to backward as ``x=`` unless ``names`` says otherwise."""
    out = model(x)
    loss = F.nll_loss(out, y) if getattr(model, "log_probs", False) else F.cross_entropy(out, y)
    model.zero_grad(set_to_none=True)
    syn.backward(loss, y, **(names or {"x": x}))


def build(name, model):
    spec = catalog.get(name)
    return spec.create(model, spec.harness_hparams, buffer_size=40, buffer_sample_size=8)


def snapshot(model, syn):
    """Everything a rejected call must leave as it was (gradients: none, as the loop's zero_grad leaves them)."""
    model.zero_grad(set_to_none=True)
    return (
        copy.deepcopy(syn.state_dict()),
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        (len(model._forward_pre_hooks), len(model._forward_hooks)),
    )


def same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def assert_unchanged(model, syn, before):
    assert same(snapshot(model, syn), before)


# ---------------------------------------------------------------------- 1. input names
@pytest.mark.parametrize("name", NAMES)
def test_a_name_forward_cannot_take_is_refused_at_the_first_step(name):
    """A-GEM used to fail only at step 2, EWC only at end_task: now every method refuses at step 1."""
    model, shape = tutorial(name)
    syn = build(name, model)
    x, y = batch([0, 1], shape=shape)
    before = snapshot(model, syn)
    with pytest.raises(ValueError, match=rf"not parameters of {type(model).__name__}.forward\(x\b.*\['x'"):
        step(model, syn, x, y, inputs=x)
    assert_unchanged(model, syn, before)
    assert syn.num_steps == 0
    step(model, syn, x, y, x=x)  # the right name trains
    assert syn.num_steps == 1


def test_the_task_end_pass_and_predict_use_the_names_backward_saw():
    model = Net()
    syn = EWC(model)
    data = [batch([0, 1], seed=s) for s in range(3)]
    for x, y in data:
        step(model, syn, x, y, x=x)
    syn.end_task(named_batches(data))  # no name: backward's 'x', not 'inputs'
    assert syn.num_tasks_ended == 1 and bool(syn.state_dict()["state"]["importance"].abs().sum() > 0)
    syn.end_task(named_batches(data, "x"))  # an explicit name keeps working
    assert syn.num_tasks_ended == 2
    assert syn.predict(x=data[0][0]).shape == (8, 6)

    before = snapshot(model, syn)
    with pytest.raises(ValueError, match=r"predict\(x=\.\.\.\)"):
        syn.predict(inputs=data[0][0])
    with pytest.raises(ValueError, match=r"not parameters of Net.forward\(x\)"):
        syn.end_task(named_batches(data, "inputs"))  # Synapse's error, not a TypeError inside torch.func
    assert_unchanged(model, syn, before)


def test_named_batches_without_a_name_before_any_step_takes_forwards_only_parameter():
    model = Net()
    syn = EWC(model)
    syn.end_task(named_batches([batch([0, 1])]))  # forward(self, x): the one name there is
    assert syn.num_tasks_ended == 1

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(8, 4)

        def forward(self, x, mask):
            return self.f(x * mask)

    two = TwoInputs()
    syn2 = EWC(two)
    before = snapshot(two, syn2)
    with pytest.raises(ValueError, match=r"named_batches\(loader, name\)"):
        syn2.end_task(named_batches([batch([0, 1])]))
    assert_unchanged(two, syn2, before)


def test_input_names_are_in_the_state_dict():
    """Every method saves the names (a memoryless one too); state dicts from before are tests/test_state.py's."""
    model = Net()
    syn = EWC(model)
    x, y = batch([0, 1])
    step(model, syn, x, y, x=x)
    state = syn.state_dict()
    assert state["state"]["input_names"] == ["x"]
    resumed = EWC(Net())
    resumed.load_state_dict(state)
    data = [batch([0, 1])]
    resumed.end_task(named_batches(data))  # resolves to 'x' from the loaded names
    fresh = EWC(Net())
    before = copy.deepcopy(fresh.state_dict())
    bad = copy.deepcopy(state)
    bad["state"]["input_names"] = [3]
    with pytest.raises(ValueError, match="input_names"):
        fresh.load_state_dict(bad)
    assert same(fresh.state_dict(), before)


# ---------------------------------------------------------------------- 2. ER in eval mode
def test_er_refuses_a_step_whose_forward_ran_in_eval_mode():
    model = Net()
    syn = ER(model, buffer_size=40, buffer_sample_size=8, method="er")
    for s in range(3):
        step(model, syn, *batch([0, 1], seed=s))
    model.eval()  # e.g. to freeze BatchNorm: the fused replay would silently be skipped
    x, y = batch([2, 3], seed=9)
    before = snapshot(model, syn)
    with pytest.raises(ValueError, match="fused=False"):
        step(model, syn, x, y)
    assert_unchanged(model, syn, before)


def test_er_with_fused_false_replays_in_eval_mode():
    """The supported way to train with frozen BatchNorm: the replay's own forward runs in eval mode too."""
    torch.manual_seed(0)
    model = Net()
    syn = ER(model, buffer_size=40, buffer_sample_size=8, method="er", fused=False)
    for s in range(3):
        step(model, syn, *batch([0, 1], seed=s))
    model.eval()
    x, y = batch([2, 3], seed=9)
    step(model, syn, x, y)
    with_replay = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    plain = [p.grad for p in model.parameters()]
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(with_replay, plain))  # the replay term is there


# ---------------------------------------------------------------------- 3. forgetting end_task()
def two_tasks(name, end_task, steps=9):
    model, shape = tutorial(name)
    syn = build(name, model)
    for t, classes in enumerate(([0, 1], [2, 3])):
        data = [batch(classes, seed=10 * t + s, shape=shape) for s in range(steps)]
        for x, y in data:
            step(model, syn, x, y)
        if end_task:
            syn.end_task(named_batches(data))
    return syn


@pytest.mark.parametrize("name", TASK_END_METHODS)
def test_a_method_that_acts_at_task_ends_warns_once_when_end_task_never_came(name):
    with pytest.warns(UserWarning, match=r"end_task\(named_batches\(loader\)\)") as record:
        two_tasks(name, end_task=False)
    assert sum("end_task(named_batches" in str(w.message) for w in record) == 1
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*end_task\\(named_batches")
        two_tasks(name, end_task=True)  # with the task ends: silent


def test_methods_without_task_work_do_not_warn():
    for name in ("er", "si", "agem"):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*end_task\\(named_batches")
            two_tasks(name, end_task=False)
    assert "l2p" in TASK_END_METHODS  # its default train_mask is reset at task ends; without the mask, nothing is
    assert not catalog.get("l2p").create(testing.toy_vit(), {"train_mask": False}).acts_at_task_end
    with pytest.warns(UserWarning, match="end_task"):  # A-GEM's episodic memory only constrains ended tasks
        model = Net()
        syn = AGEM(model, buffer_size=40, buffer_sample_size=8, memory="episodic")
        for t, classes in enumerate(([0, 1], [2, 3])):
            for s in range(9):
                step(model, syn, *batch(classes, seed=10 * t + s))


@pytest.mark.parametrize("name", ["ewc", "lwf", "mas"])
def test_the_task_free_stream_refuses_methods_that_act_at_task_ends(name, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--dataset", "fashion-mnist-360", "--synapse_type", name, "--quiet"])
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "error:" in line]
    assert e.value.code == 2 and len(errors) == 1 and errors[0] == err.splitlines()[-1]  # argparse's usage, one line
    assert f"{name} needs task boundaries" in err and "fine-tuning" in err and "Traceback" not in err
    assert not catalog.get(name).task_free and catalog.get("er").task_free and catalog.get("si").task_free


# ---------------------------------------------------------------------- 4. a second method on the model
def test_a_second_method_on_a_hooked_model_raises_and_changes_nothing():
    """Both outcomes of the issue: DER++ built twice (split_with_sizes errors), and DER++ then A-GEM (16
    extra replay rows on every forward, silently)."""
    model = Net()
    first = ER(model, buffer_size=40, buffer_sample_size=8, method="der++")
    for s in range(3):
        step(model, first, *batch([0, 1], seed=s))
    before = snapshot(model, first)
    for second in (
        lambda: ER(model, buffer_size=40, buffer_sample_size=8, method="der++"),
        lambda: AGEM(model, buffer_size=40, buffer_sample_size=8),
    ):
        with pytest.raises(RuntimeError, match=r"live DERpp.*remove_hooks\(\)"):
            second()
        assert_unchanged(model, first, before)
    first.remove_hooks()
    agem = AGEM(model, buffer_size=40, buffer_sample_size=8)
    x, y = batch([2, 3])
    assert model(x).shape[0] == 8  # no replay rows ride along any more
    step(model, agem, x, y)
    assert agem.num_steps == 1


def test_a_method_nothing_refers_to_any_more_does_not_block_a_new_one():
    """A notebook cell run again: the old object is unreachable (possibly in a reference cycle)."""
    model = Net()
    ER(model, buffer_size=40, buffer_sample_size=8, method="der++")  # never kept
    syn = ER(model, buffer_size=40, buffer_sample_size=8, method="der++")
    for s in range(3):
        step(model, syn, *batch([0, 1], seed=s))
    assert len(model._forward_pre_hooks) == len(model._forward_hooks) == 1  # the dead method's hooks are gone


# ---------------------------------------------------------------------- 5. log-probability outputs
@pytest.mark.parametrize("name", LOGIT_READERS)
def test_log_probability_outputs_warn_once_for_methods_that_read_logits(name):
    model = Net(log_probs=True)
    syn = build(name, model)
    with pytest.warns(UserWarning, match="log-probabilities") as record:
        for s in range(3):
            step(model, syn, *batch([0, 1], seed=s))
    assert sum("log-probabilities" in str(w.message) for w in record) == 1
    raw = Net()
    syn = build(name, raw)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*log-probabilities")
        for s in range(3):
            step(raw, syn, *batch([0, 1], seed=s))


def test_methods_whose_loss_is_a_cross_entropy_accept_log_probabilities():
    """CE of log-probabilities equals CE of logits (log_softmax is idempotent): ER and ER-ACE need no word."""
    assert set(LOGIT_READERS) == {"der", "der++", "xder", "icarl", "bic", "lwf"}
    for name in ("er", "er-ace"):
        model = Net(log_probs=True)
        syn = build(name, model)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*log-probabilities")
            for s in range(3):
                step(model, syn, *batch([0, 1], seed=s))


@pytest.mark.parametrize("name", NAMES)
def test_a_forward_in_eval_mode_is_refused_exactly_by_the_methods_that_need_a_training_forward(name):
    """The README's table says which methods need the training forward: each of them refuses a step whose
    forward ran in eval mode (nothing changed); the others train as usual."""
    model, shape = tutorial(name)
    syn = build(name, model)
    for s in range(3):
        step(model, syn, *batch([0, 1], seed=s, shape=shape))
    model.eval()
    x, y = batch([0, 1], seed=9, shape=shape)
    if syn.needs_training_forward:
        before = snapshot(model, syn)
        with pytest.raises(ValueError, match="train|eval"):
            step(model, syn, x, y)
        assert_unchanged(model, syn, before)
    else:
        step(model, syn, x, y)
        assert syn.num_steps == 4


# ---------------------------------------------------------------------- 6. the docs say it
def test_readme_usage_table_is_the_catalogs():
    import os

    from synapse.catalog import usage_table

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as f:
        readme = f.read()
    start, end = readme.index("<!-- usage:start -->"), readme.index("<!-- usage:end -->")
    assert readme[start:end].split("\n", 1)[1].strip() == usage_table().strip()
    assert "TaskDict" in readme and "def _create_dataset(self, train):" in readme and "x=data" in readme


# ---------------------------------------------------------------------- on CUDA: the same, without a sync
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["der++", "lwf", "icarl"])
def test_on_cuda_the_warnings_come_without_a_host_sync(name):
    """Both value checks read the device asynchronously: under the sync debug mode that raises on any sync
    (from the second step on: the first allocates the method's memory), they still warn, a step or so late."""
    model = Net(log_probs=True).cuda()
    syn = build(name, model)
    data = [
        [tuple(v.cuda() for v in batch(classes, seed=10 * t + s)) for s in range(24)]
        for t, classes in enumerate(([0, 1], [2, 3]))
    ]
    with pytest.warns(UserWarning) as record:
        step(model, syn, *data[0][0])  # the log-probability test is queued here
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for x, y in data[0][1:] + data[1]:  # targets read every 8th step, the first of task 2 included
                step(model, syn, x, y)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    messages = [str(w.message) for w in record]
    assert sum("log-probabilities" in m for m in messages) == 1
    assert sum("end_task(named_batches" in m for m in messages) == (1 if syn.acts_at_task_end else 0)


@pytest.mark.parametrize("cls", [SimpleCIL, RanPAC])
def test_a_batch_norm_layer_in_train_mode_is_warned_about_once_by_a_method_that_trains_nothing(cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4))
    method = cls(model, **({"projection_dim": 16, "ridge": 1.0} if cls is RanPAC else {}))
    x, y = torch.randn(10, 8), torch.arange(10) % 4
    model.eval()  # as it should be: silent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method.backward(F.cross_entropy(model(x), y), y, input=x)
    model.train()  # the running statistics move, and each batch is normalised by its own
    with pytest.warns(UserWarning, match=r"BatchNorm layers are in train mode.*model.eval\(\)") as caught:
        method.backward(F.cross_entropy(model(x), y), y, input=x)
    assert len(caught) == 1 and caught[0].filename == __file__  # points at the user's backward call
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        method.backward(F.cross_entropy(model(x), y), y, input=x)


@pytest.mark.parametrize("by_habit", [True, False])
def test_prompts_an_optimizer_never_steps_are_warned_about_once(by_habit, monkeypatch):
    pytest.importorskip("timm")
    from synapse._watch import OwnParameterWatch
    from synapse.pretrained import L2P

    monkeypatch.setattr(OwnParameterWatch, "patience", 3)  # 50 steps in use; a few here
    torch.manual_seed(0)
    model = testing.toy_vit()
    method = L2P(model)
    assert method.own_parameters() and all(not any(p is q for q in model.parameters()) for p in method.own_parameters())
    params = model.parameters() if by_habit else method.trainable_parameters()
    optimizer = torch.optim.SGD(params, lr=0.01)
    x, y = testing.toy_images(1)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(method._own_watch.patience + 5):
            optimizer.zero_grad()
            method.backward(F.cross_entropy(model(x), y), y, x=x)
            optimizer.step()
    found = [w for w in caught if "optimizer does not hold them" in str(w.message)]
    assert len(found) == (1 if by_habit else 0)
    if by_habit:
        assert "synapse.trainable_parameters()" in str(found[0].message) and found[0].filename == __file__


@pytest.mark.parametrize("method", ["er", "der++"])
def test_targets_outside_the_head_are_refused_at_each_tasks_first_step_before_anything_is_stored(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))  # a 2-way head trained on each task's local labels
    syn = ER(model, buffer_size=16, buffer_sample_size=4, method=method)
    x, y = torch.randn(4, 1, 4, 4), torch.tensor([2, 3, 2, 3])  # the global labels, given by mistake
    with pytest.raises(ValueError, match=r"class indices in \[0, 2\) .* got values in \[2, 3\]"):
        syn.backward(F.cross_entropy(model(x), y - 2), y, input=x)
    assert len(syn.buffer) == 0 and syn.num_steps == 0
    syn.backward(F.cross_entropy(model(x), y - 2), y - 2, input=x)
    syn.backward(F.cross_entropy(model(x), y - 2), y - 2, input=x)
    syn.end_task()
    stored = len(syn.buffer)
    with pytest.raises(ValueError, match="class indices"):  # read again at the next task's first step
        syn.backward(F.cross_entropy(model(x), y - 2), y, input=x)
    assert len(syn.buffer) == stored
