"""iCaRL: its loss and its nearest-mean classifier against hand computations, the method's gradient against
the explicit objective on the recorded replay rows, the herding memory it fills, its predictor, resume,
rejected input, and the experiment program's use of the predictor."""

import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import batches, mlp, step
from synapse import catalog
from synapse.functional import herding_selection, icarl_loss, nearest_mean_scores
from synapse.rehearsal import ICaRL


def task_data(batches):
    return [(y, {"input": x}) for x, y in batches]


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


# ---------------------------------------------------------------------------------------- the pure functions
def test_icarl_loss_matches_a_hand_computation():
    logits = torch.tensor([[1.0, -1.0, 2.0], [0.0, 3.0, -2.0]], requires_grad=True)
    targets = torch.tensor([1, 2])
    old_logits = torch.tensor([[2.0, 5.0, 5.0], [-1.0, 5.0, 5.0]])  # only column 0 is old: the rest is unused
    old = torch.tensor([True, False, False])
    loss = icarl_loss(logits, targets, old_logits, old)
    # targets: column 0 from the old network, columns 1, 2 one-hot
    t = [[sigmoid(2.0), 1.0, 0.0], [sigmoid(-1.0), 0.0, 1.0]]
    z = [[1.0, -1.0, 2.0], [0.0, 3.0, -2.0]]

    def bce(zz, tt):
        return -(tt * math.log(sigmoid(zz)) + (1 - tt) * math.log(1 - sigmoid(zz)))

    expected = sum(bce(z[i][c], t[i][c]) for i in range(2) for c in range(3)) / 6
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    hand = torch.tensor([[(sigmoid(z[i][c]) - t[i][c]) / 6 for c in range(3)] for i in range(2)])
    assert torch.allclose(logits.grad, hand, atol=1e-6)

    # Classes {0, 1} only (class 2 not seen): the mean over 2 rows x 2 columns, no gradient to column 2.
    logits.grad = None
    seen = torch.tensor([True, True, False])
    loss = icarl_loss(logits, targets, old_logits, old, seen)
    assert loss.item() == pytest.approx(sum(bce(z[i][c], t[i][c]) for i in range(2) for c in range(2)) / 4, abs=1e-6)
    loss.backward()
    assert logits.grad[:, 2].tolist() == [0.0, 0.0]
    assert logits.grad[1, 0].item() == pytest.approx((sigmoid(0.0) - sigmoid(-1.0)) / 4, abs=1e-6)

    # No old network: plain one-hot BCE; an old network narrower than the head (it grew) is padded.
    assert icarl_loss(logits, targets).item() == pytest.approx(
        sum(bce(z[i][c], float(c == targets[i])) for i in range(2) for c in range(3)) / 6, abs=1e-6
    )
    assert icarl_loss(logits, targets, old_logits[:, :1], old).item() == pytest.approx(expected, abs=1e-6)


def test_nearest_mean_scores_match_a_hand_computation():
    features = torch.tensor([[3.0, 4.0], [2.0, 0.0]])  # normalised: (0.6, 0.8), (1, 0)
    means = torch.tensor([[5.0, 0.0], [0.0, 0.5]])  # normalised: (1, 0), (0, 1)
    scores = nearest_mean_scores(features, means)
    # row 0: |(0.6, 0.8) - (1, 0)| = sqrt(0.16 + 0.64), |(0.6, 0.8) - (0, 1)| = sqrt(0.36 + 0.04)
    # row 1: 0 to class 0, sqrt(2) to class 1
    hand = torch.tensor([[-math.sqrt(0.8), -math.sqrt(0.4)], [0.0, -math.sqrt(2.0)]])
    assert torch.allclose(scores, hand, atol=1e-6)
    assert scores.argmax(1).tolist() == [1, 0]
    # Unnormalised: plain distances. A class without a mean scores -inf.
    raw = nearest_mean_scores(features, means, torch.tensor([True, False]), normalize=False)
    assert raw[:, 0].tolist() == pytest.approx([-math.sqrt(4 + 16), -3.0])
    assert raw[:, 1].tolist() == [float("-inf")] * 2


# ---------------------------------------------------------------------------------------- the method
def test_end_task_fills_the_herding_memory_with_the_heads_input_features():
    torch.manual_seed(0)
    model = mlp()
    syn = ICaRL(model, 12, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    first, second = batches(3, [0, 1], seed=1), batches(3, [2, 3], seed=2)
    for x, y in first:
        step(model, syn, x, y, opt)
    syn.end_task(task_data(first))
    assert syn.buffer.classes == (0, 1) and syn.buffer.exemplars_per_class == 6
    assert [b - a for a, b in syn.buffer.class_ranges().values()] == [6, 6]
    for x, y in second:
        step(model, syn, x, y, opt)
    syn.end_task(task_data(second))
    # four classes share 12 slots: 3 each, the old ones keep their first 3
    assert syn.buffer.classes == (0, 1, 2, 3) and [b - a for a, b in syn.buffer.class_ranges().values()] == [3] * 4
    # herding on what enters the last Linear, as a direct computation does
    x = torch.cat([x for x, _ in second])
    y = torch.cat([y for _, y in second])
    with torch.no_grad():
        phi = model[:-1](x)
    for label in (2, 3):
        members = (y == label).nonzero().flatten()
        expected = x[members[herding_selection(phi[members], 3)]]
        assert torch.equal(syn.buffer.class_items(label)["input:input"], expected)
    assert syn.needs_task_data and syn.needs_task_boundaries and ICaRL.has_predictor


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("current_loss", ["method", "user"])
def test_gradient_is_the_explicit_objective_on_the_recorded_replay_rows(fused, current_loss):
    torch.manual_seed(0)
    model = mlp()
    syn = ICaRL(model, 30, 6, fused=fused, current_loss=current_loss)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    first, second = batches(4, [0, 1, 2]), batches(3, [3, 4], seed=1)
    for x, y in first:
        step(model, syn, x, y, opt)
    syn.end_task(task_data(first))
    old_model = copy.deepcopy(model)  # the network at the task end (a deep copy carries no hooks)
    for x, y in second[:2]:
        step(model, syn, x, y, opt)

    last = syn.last_replay
    snapshot = copy.deepcopy(model)
    x, y = second[2]
    y = y.clone()
    y[0] = 5  # a class seen for the first time joins the loss at once
    model.zero_grad()
    step(model, syn, x, y, loss_fn=lambda out, t: F.cross_entropy(out, t) * 1000 + out.sum())
    applied = [p.grad.clone() for p in model.parameters()]

    replay = syn.last_replay  # the rows this step replayed
    assert replay is not last and len(replay["targets"]) == 6
    xr, yr = replay["input:input"], replay["targets"]
    old, classes = [0, 1, 2], [0, 1, 2, 3, 4, 5]  # from the labels the test fed in

    def objective(logits, labels, inputs):  # by hand: the targets matrix, then the mean over the S columns
        t = F.one_hot(labels, 10).float()
        t[:, old] = torch.sigmoid(old_model(inputs))[:, old]
        return F.binary_cross_entropy_with_logits(logits[:, classes], t[:, classes])

    out = snapshot(x)
    current = objective(out, y, x) if current_loss == "method" else F.cross_entropy(out, y) * 1000 + out.sum()
    expected_loss = (8 * current + 6 * objective(snapshot(xr), yr, xr)) / 14
    expected = torch.autograd.grad(expected_loss, list(snapshot.parameters()))
    for a, b in zip(applied, expected):
        assert torch.allclose(a, b, atol=1e-5)
    assert syn.seen_classes.tolist() == [True] * 6 + [False] * 4
    assert syn.old_classes.tolist() == [True] * 3 + [False] * 7


def test_predict_is_the_nearest_class_mean_of_the_exemplars():
    torch.manual_seed(0)
    model = mlp()
    syn = ICaRL(model, 20, 4, head="5")  # the last layer of the Sequential, named by its index
    x_test = torch.randn(8, 1, 28, 28)
    model.eval()
    untrained = model(x_test)
    model.train()
    assert torch.equal(syn.predict(input=x_test), untrained)  # no exemplar yet: the head is all there is
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = batches(4, [0, 1, 2, 3])
    for x, y in data:
        step(model, syn, x, y, opt)
    syn.end_task(task_data(data))
    # by hand: each class's normalised mean of its exemplars' normalised features, from the memory
    with torch.no_grad():
        means = torch.stack(
            [F.normalize(model[:-1](syn.buffer.class_items(c)["input:input"]), dim=1).mean(0) for c in range(4)]
        )
        phi = F.normalize(model[:-1](x_test), dim=1)
    means = F.normalize(means, dim=1)
    expected = -(phi.unsqueeze(1) - means.unsqueeze(0)).norm(dim=2)
    scores = syn.predict(input=x_test)
    assert torch.allclose(scores[:, :4], expected, atol=1e-5)
    assert torch.isinf(scores[:, 4:]).all() and (scores[:, 4:] < 0).all()  # classes never seen
    assert torch.allclose(syn.class_means[:4], means, atol=1e-6)
    # predict reads the stored means: moving one moves the predictions
    syn.class_means[2] = phi[0]
    assert syn.predict(input=x_test)[0].argmax().item() == 2
    assert model.training  # predict restored the mode


class _HeadFirst(nn.Module):
    """The head is registered before a projection layer: the last nn.Linear is not the head."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 10)
        self.proj = nn.Linear(784, 16)

    def forward(self, input):
        return self.fc(torch.relu(self.proj(input.flatten(1))))


def test_bad_arguments_are_rejected_and_change_nothing():
    model = mlp()
    with pytest.raises(ValueError, match="not both"):
        ICaRL(model, 40, 8, feature_extractor=lambda inputs: inputs["input"].flatten(1), head="5")
    with pytest.raises(TypeError, match="feature_extractor must be callable"):
        ICaRL(model, 40, 8, feature_extractor="5")
    with pytest.raises(ValueError, match="no submodule 'fc'"):
        ICaRL(model, 40, 8, head="fc")
    with pytest.raises(ValueError, match="no nn.Linear"):
        ICaRL(nn.Sequential(nn.Flatten(), nn.Conv1d(1, 1, 1)), 40, 8)
    assert not model._forward_hooks and not model._forward_pre_hooks  # nothing was hooked
    assert all(not m._forward_pre_hooks for m in model.modules())

    # The default head of a model whose last-registered Linear is not its head: caught at the task end.
    odd = _HeadFirst()
    syn = ICaRL(odd, 40, 8)
    data = batches(2, [0, 1])
    for x, y in data:
        step(odd, syn, x, y)
    with pytest.raises(ValueError, match="head="):
        syn.end_task(task_data(data))
    assert len(syn.buffer) == 0 and syn.teacher is None and syn.num_tasks_ended == 0
    ICaRL(_HeadFirst(), 40, 8, head="fc")  # naming it works


def test_rejected_calls_change_nothing():
    torch.manual_seed(0)
    model = mlp()
    syn = ICaRL(model, 40, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = batches(3, [0, 1, 2])
    for x, y in data:
        step(model, syn, x, y, opt)
    syn.end_task(task_data(data))
    step(model, syn, *batches(1, [3, 4], seed=3)[0], opt)

    x, y = batches(1, [5, 6], seed=4)[0]
    loss = F.cross_entropy(model(x), y)  # draws this step's replay rows
    before = copy.deepcopy(syn.state_dict())
    with pytest.raises(ValueError, match="non-empty"):
        syn.backward(loss, torch.zeros(0, dtype=torch.long), input=x[:0])
    with pytest.raises(ValueError, match="outside the model's 10 classes"):
        syn.end_task([(torch.tensor([1, 12]), {"input": x[:2]})])
    with pytest.raises(TypeError, match="targets, "):
        syn.end_task([x])
    with pytest.raises(ValueError, match="batch_size"):
        syn.update_class_means(0)

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return torch.equal(a, b)
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
        return a == b

    assert same(syn.state_dict(), before)


def test_catalog_entry_trains_with_task_ends():
    spec = catalog.get("icarl")
    assert spec.cls is ICaRL and spec.family == "rehearsal" and spec.defaults() == {"current_loss": "method"}
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
    assert syn.num_steps == 20 and syn.num_tasks_ended == 2 and sorted(syn.buffer.classes) == list(range(10))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(syn.predict(input=x)).all()  # every class has exemplars


def test_the_experiment_program_evaluates_with_the_predictor(tmp_path):
    from synapse.experiments.cli import main

    args = ["--dataset", "fashion-mnist", "--max_train_per_task", "100", "--max_test_per_task", "50", "--quiet"]
    args += ["--training_type", "continual", "--synapse_type", "icarl", "--buffer_size", "100"]
    assert main([*args, "--output_dir", str(tmp_path)]) == 0
    with open(os.path.join(tmp_path, "results.json")) as f:
        results = json.load(f)
    assert results["predictor"] == "ICaRL.predict"
    assert results["config"]["method_args"] == {"current_loss": "method"}
    final = results["accuracy_matrix"]["class_il"][-1]
    assert len(final) == 5 and sum(final) / 5 > 0.2  # nearest means over all ten classes: above chance
