"""SLCA (synapse.pretrained.SLCA) and its pure functions (synapse.functional.alignment).

The invariants of issue 24's table: the backbone's learning rate is the slow-learner ratio of the head's, the
class statistics equal the batch closed form and are PSD, and classifier alignment changes only the head.
The functions are checked against numbers worked out by hand, and the alignment loop against a plain
re-statement of the authors' procedure (SGD with momentum and weight decay, cosine-annealed per epoch).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from synapse import named_batches, testing
from synapse.functional import (
    align_classifier,
    alignment_loss,
    class_moments,
    mean_and_covariance,
    mean_decay,
    sample_class_features,
    task_normalized_logits,
)
from synapse.pretrained import SLCA

pytest.importorskip("timm")


# ------------------------------------------------------------------------------------ the pure functions
def test_class_moments_by_hand():
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    counts, sums, second = class_moments(features, torch.tensor([0, 1, 0]), torch.tensor([0, 1, 7]))
    assert counts.dtype == torch.float64
    assert counts.tolist() == [2.0, 1.0, 0.0]
    assert sums.tolist() == [[6.0, 8.0], [3.0, 4.0], [0.0, 0.0]]
    # [1,2]^T[1,2] + [5,6]^T[5,6] and [3,4]^T[3,4]
    assert second[0].tolist() == [[26.0, 32.0], [32.0, 40.0]]
    assert second[1].tolist() == [[9.0, 12.0], [12.0, 16.0]]
    assert second[2].abs().sum() == 0


def test_mean_and_covariance_by_hand():
    counts, sums, second = class_moments(
        torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), torch.tensor([0, 1, 0]), torch.tensor([0, 1])
    )
    means, covs = mean_and_covariance(counts, sums, second, ridge=0.5)
    assert means.tolist() == [[3.0, 4.0], [3.0, 4.0]]
    # class 0: deviations (-2, -2) and (2, 2): scatter [[8, 8], [8, 8]] over n - 1 = 1; plus 0.5 I
    assert covs[0].tolist() == [[8.5, 8.0], [8.0, 8.5]]
    # class 1 has a single sample: no scatter, the ridge alone
    assert covs[1].tolist() == [[0.5, 0.0], [0.0, 0.5]]


def test_mean_and_covariance_equal_torch_cov_over_batches():
    g = torch.Generator().manual_seed(0)
    features, targets = torch.randn(40, 5, generator=g) * 3 + 1, torch.randint(0, 3, (40,), generator=g)
    classes = torch.arange(3)
    total = [torch.zeros(3, dtype=torch.float64), torch.zeros(3, 5, dtype=torch.float64)]
    total.append(torch.zeros(3, 5, 5, dtype=torch.float64))
    for f, y in zip(features.split(7), targets.split(7)):  # streamed in batches of 7
        for t, part in zip(total, class_moments(f, y, classes)):
            t.add_(part)
    means, covs = mean_and_covariance(*total, ridge=1e-4)
    for c in range(3):
        rows = features[targets == c].double()
        assert torch.allclose(means[c], rows.mean(0))
        assert torch.allclose(covs[c], torch.cov(rows.T) + 1e-4 * torch.eye(5), atol=1e-10)


def test_mean_decay_by_hand():
    # 0.9 + 0.1 (t + 1) / (T + 1) with T = 2
    assert torch.allclose(
        mean_decay(torch.tensor([0, 1, 2]), 2), torch.tensor([0.9 + 0.1 / 3, 0.9 + 0.2 / 3, 1.0]).double()
    )


def test_sample_class_features_by_hand():
    means = torch.tensor([[1.0, 0.0]])
    tril = torch.tensor([[[2.0, 0.0], [1.0, 3.0]]])
    noise = torch.tensor([[[1.0, 1.0], [0.0, -1.0]]])
    # L z = (2, 1 + 3) and (0, -3)
    assert sample_class_features(means, tril, noise).tolist() == [[[3.0, 4.0], [1.0, -3.0]]]


def test_task_normalized_logits_by_hand():
    logits = torch.tensor([[3.0, 4.0, 0.0, 5.0]])
    out = task_normalized_logits(logits, torch.tensor([0, 0, 1, 1]), 2, temperature=0.5)
    # per-task norms 5 and 5 (each + 1e-7), mean 5 + 1e-7: logits / (5 + 1e-7) / 0.5
    assert torch.allclose(out, logits / (5 + 1e-7) / 0.5)
    assert torch.allclose(out, torch.tensor([[1.2, 1.6, 0.0, 2.0]]))
    uneven = task_normalized_logits(torch.tensor([[6.0, 8.0, 1.0]]), torch.tensor([0, 0, 1]), 2, temperature=1.0)
    assert torch.allclose(uneven, torch.tensor([[6.0, 8.0, 1.0]]) / 5.5)  # norms 10 and 1, mean 5.5


def test_alignment_loss_without_normalisation_is_cross_entropy():
    logits, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    ids = torch.tensor([0, 0, 1, 1])
    assert torch.equal(alignment_loss(logits, y, ids, 2, None), F.cross_entropy(logits, y))
    normed = task_normalized_logits(logits, ids, 2, 0.1)
    assert torch.equal(alignment_loss(logits, y, ids, 2, 0.1), F.cross_entropy(normed, y))


def reference_alignment(weight, bias, means, covs, task_ids, num_tasks, epochs, lr, momentum, wd, s, tau, seed):
    """The authors' procedure (models/slca.py, _stage2_compact_classifier), restated plainly: each epoch, s
    draws per class from MultivariateNormal(mean, cov), shuffled, in batches of s; SGD with momentum and
    weight decay written out; the lr a cosine of the epoch."""
    g = torch.Generator().manual_seed(seed)
    w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    buffers = [None, None]
    k = len(means)
    for epoch in range(epochs):
        step_lr = lr * (1 + math.cos(math.pi * epoch / epochs)) / 2
        noise = torch.randn(k, s, weight.shape[1], generator=g)
        drawn = []
        for c in range(k):
            dist = torch.distributions.MultivariateNormal(means[c].float(), covs[c].float())
            drawn.append(dist.loc + noise[c] @ dist.scale_tril.T)  # what dist.sample() computes from its draws
        x = torch.cat(drawn)
        y = torch.arange(k).repeat_interleave(s)
        order = torch.randperm(k * s, generator=g)
        x, y = x[order], y[order]
        for i in range(k):
            xb, yb = x[i * s : (i + 1) * s], y[i * s : (i + 1) * s]
            logits = xb @ w.T + b
            norms = torch.stack([logits[:, task_ids == t].norm(dim=1) + 1e-7 for t in range(num_tasks)], 1).mean(
                1, keepdim=True
            )
            loss = F.cross_entropy(logits / norms / tau, yb)
            grads = torch.autograd.grad(loss, [w, b])
            with torch.no_grad():
                for j, (p, grad) in enumerate(zip((w, b), grads)):
                    d = grad + wd * p
                    buffers[j] = d.clone() if buffers[j] is None else momentum * buffers[j] + d
                    p -= step_lr * buffers[j]
    return w.detach(), b.detach()


def test_align_classifier_follows_the_authors_procedure():
    g = torch.Generator().manual_seed(3)
    k, d = 4, 6
    weight, bias = torch.randn(k, d, generator=g) * 0.1, torch.randn(k, generator=g) * 0.1
    means = torch.randn(k, d, generator=g, dtype=torch.float64)
    a = torch.randn(k, d, d, generator=g)
    covs = a @ a.transpose(1, 2) / d + 0.1 * torch.eye(d)
    task_ids = torch.tensor([0, 0, 1, 1])
    settings = dict(epochs=3, lr=0.05, momentum=0.9, weight_decay=5e-4, samples_per_class=5, temperature=0.1)
    w0, b0 = weight.clone(), bias.clone()
    w, b = align_classifier(
        weight,
        bias,
        means,
        torch.linalg.cholesky(covs),
        task_ids,
        2,
        generator=torch.Generator().manual_seed(7),
        **settings,
    )
    assert torch.equal(weight, w0) and torch.equal(bias, b0)  # the inputs are left as they were
    ref_w, ref_b = reference_alignment(weight, bias, means, covs, task_ids, 2, 3, 0.05, 0.9, 5e-4, 5, 0.1, seed=7)
    assert not torch.allclose(w, weight, atol=1e-3)  # it trained
    assert torch.allclose(w, ref_w, atol=1e-5) and torch.allclose(b, ref_b, atol=1e-5)


# ------------------------------------------------------------------------------------------- the method
def vit(classes=10):
    torch.manual_seed(0)
    return testing.toy_vit(classes)


def images(classes, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes).repeat(n // len(classes) + 1)[:n]
    return torch.randn(n, 3, 16, 16, generator=g) + y[:, None, None, None].float(), y


def train_task(model, slca, optimizer, classes, steps=2, seed=0, end=True):
    data = [images(classes, seed=seed * 100 + s) for s in range(steps)]
    for x, y in data:
        optimizer.zero_grad()
        slca.backward(F.cross_entropy(model(x), y), y, x=x)
        optimizer.step()
    if end:
        slca.end_task(named_batches(data))
    return data


def pre_logits(model, x):
    """The ViT's pre-logits in eval mode, computed by timm itself (not through the method's hook)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model.forward_head(model.forward_features(x), pre_logits=True)
    model.train(was)
    return out


def test_the_backbone_lr_is_the_slow_learner_ratio_of_the_heads():
    model = vit()
    slca = SLCA(model)
    head, backbone = slca.param_groups(0.01)
    assert head["lr"] == 0.01 and backbone["lr"] == pytest.approx(0.01 * 0.01)  # the authors' 1e-4 vs 1e-2
    assert {id(p) for p in head["params"]} == {id(model.head.weight), id(model.head.bias)}
    everything = [id(p) for p in model.parameters()]
    assert sorted(id(p) for g in (head, backbone) for p in g["params"]) == sorted(everything)  # each once
    optimizer = torch.optim.SGD(slca.param_groups(0.5), momentum=0.9)
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.5 * 0.01]
    other = SLCA(vit(), backbone_lr_scale=0.1)
    assert [g["lr"] for g in other.param_groups(0.2)] == [0.2, pytest.approx(0.02)]
    with pytest.raises(ValueError, match="lr"):
        slca.param_groups(0.0)


def test_a_zero_ratio_freezes_the_backbone():
    model = vit()
    slca = SLCA(model, backbone_lr_scale=0)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    (group,) = slca.param_groups(0.01)
    weights = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head")}
    optimizer = torch.optim.SGD(slca.param_groups(0.01), momentum=0.9)
    train_task(model, slca, optimizer, [0, 1])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


def test_class_statistics_equal_the_batch_closed_form_and_are_psd():
    model = vit()
    slca = SLCA(model, covariance_ridge=0.0)
    optimizer = torch.optim.SGD(slca.param_groups(0.01), momentum=0.9)
    data = train_task(model, slca, optimizer, [0, 1, 2], steps=3)
    x, y = torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data])
    features = pre_logits(model, x).double()
    assert slca.stat_classes.tolist() == [0, 1, 2] and slca.class_tasks.tolist() == [0, 0, 0]
    for i, c in enumerate([0, 1, 2]):
        rows = features[y == c]
        assert torch.allclose(slca.class_means[i], rows.mean(0), atol=1e-6)
        assert torch.allclose(slca.class_covariances[i].double(), torch.cov(rows.T), atol=1e-5)
        eigenvalues = torch.linalg.eigvalsh(slca.class_covariances[i].double())
        assert eigenvalues.min() > -1e-5 * eigenvalues.max()  # PSD (8 samples in 32 dims: rank <= 7)
    ridged = SLCA(vit())  # the authors' 1e-4 ridge makes every covariance positive definite
    train_task(ridged.module, ridged, torch.optim.SGD(ridged.param_groups(0.01)), [0, 1, 2], steps=3)
    assert torch.linalg.eigvalsh(ridged.class_covariances.double()).min() > 0.5e-4
    torch.linalg.cholesky(ridged.class_covariances)  # what sampling needs


def test_a_class_seen_again_takes_its_new_statistics():
    model = vit()
    slca = SLCA(model, ca_samples=4, ca_epochs=1)
    optimizer = torch.optim.SGD(slca.param_groups(0.01))
    train_task(model, slca, optimizer, [0, 1])
    train_task(model, slca, optimizer, [1, 2], seed=1)
    assert slca.stat_classes.tolist() == [0, 1, 2] and slca.class_tasks.tolist() == [0, 1, 1]


def test_alignment_changes_only_the_heads_rows_of_the_classes_seen():
    model = vit()
    slca = SLCA(model, ca_samples=16)
    optimizer = torch.optim.SGD(slca.param_groups(0.01), momentum=0.9)
    before = copy.deepcopy(model.state_dict())
    train_task(model, slca, optimizer, [0, 1], end=False)
    trained = copy.deepcopy(model.state_dict())
    slca.end_task(named_batches([images([0, 1])]))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in trained.items())  # no alignment after task 1
    assert not torch.equal(before["blocks.0.attn.qkv.weight"], trained["blocks.0.attn.qkv.weight"])  # it learns
    train_task(model, slca, optimizer, [2, 3], seed=1, end=False)
    trained = copy.deepcopy(model.state_dict())
    slca.end_task(named_batches([images([2, 3], seed=5)]))
    after = model.state_dict()
    changed = [k for k in trained if not torch.equal(trained[k], after[k])]
    assert changed == ["head.weight", "head.bias"]
    rows_changed = (trained["head.weight"] != after["head.weight"]).any(1)
    assert rows_changed.tolist() == [True] * 4 + [False] * 6  # the seen classes' rows only


def test_alignment_starts_from_the_rows_each_task_left():
    """The authors restore the head as stage 1 left it after evaluating: a class's rows at the next
    alignment are those its own task trained, whatever happened to them since."""
    results = []
    for disturb in (False, True):
        model = vit()
        slca = SLCA(model, ca_samples=8)
        optimizer = torch.optim.SGD(slca.param_groups(0.01))
        torch.manual_seed(5)
        train_task(model, slca, optimizer, [0, 1])
        train_task(model, slca, optimizer, [2, 3], seed=1, end=False)
        if disturb:
            with torch.no_grad():
                model.head.weight[:2] += 1.0  # the old classes' rows, as a user's loss or weight decay may move them
        slca.end_task(named_batches([images([2, 3], seed=5)]))
        results.append(model.head.weight[:4].clone())
    assert torch.equal(*results)


@pytest.mark.parametrize("current_loss", ["method", "user"])
def test_without_alignment_the_earlier_rows_end_as_their_task_left_them(current_loss):
    """The authors freeze the earlier tasks' heads. Here the loss gives their rows no gradient but weight decay
    moves them; with no alignment (ca_epochs=0) the task end puts back the rows each task left. A user's own
    loss may train them on purpose: then they are kept."""
    model = vit()
    slca = SLCA(model, ca_epochs=0, current_loss=current_loss)
    torch.manual_seed(5)
    train_task(model, slca, torch.optim.SGD(slca.param_groups(0.01)), [0, 1])
    left = model.head.weight[:2].clone(), model.head.bias[:2].clone()
    optimizer = torch.optim.SGD(slca.param_groups(0.01), momentum=0.9, weight_decay=0.5)
    train_task(model, slca, optimizer, [2, 3], seed=1, end=False)
    moved = model.head.weight[:2].clone()
    assert not torch.equal(moved, left[0])  # weight decay moved the earlier rows during the task
    trained = model.head.weight[2:4].clone()
    slca.end_task(named_batches([images([2, 3], seed=5)]))
    if current_loss == "method":
        assert torch.equal(model.head.weight[:2], left[0]) and torch.equal(model.head.bias[:2], left[1])
    else:
        assert torch.equal(model.head.weight[:2], moved)
    assert torch.equal(model.head.weight[2:4], trained)  # the task's own rows stay as trained


def test_the_method_loss_is_the_current_tasks_cross_entropy():
    model = vit()
    slca = SLCA(model)
    optimizer = torch.optim.SGD(slca.param_groups(0.01))
    train_task(model, slca, optimizer, [0, 1])
    x, y = images([2, 3], seed=9)
    reference = copy.deepcopy(model)
    logits = reference(x)
    F.cross_entropy(logits[:, 2:4], y - 2).backward()  # the authors' logits[:, known:] with shifted targets
    model.zero_grad()
    slca.backward(F.cross_entropy(model(x), y), y, x=x)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name
    assert model.head.weight.grad[[0, 1, *range(4, 10)]].abs().sum() == 0
    user = SLCA(vit(), current_loss="user")
    out = user.module(x)
    loss = F.cross_entropy(out, y)
    (expected,) = torch.autograd.grad(loss, [user.module.head.weight], retain_graph=True)
    user.backward(loss, y, x=x)
    assert torch.allclose(user.module.head.weight.grad, expected)


def test_predict_masks_the_classes_not_seen():
    model = vit()
    slca = SLCA(model)
    train_task(model, slca, torch.optim.SGD(slca.param_groups(0.01)), [0, 1], end=False)
    x, _ = images([0, 1])
    scores = slca.predict(x=x)
    assert torch.isinf(scores[:, 2:]).all() and torch.isfinite(scores[:, :2]).all()
    model.eval()
    assert torch.allclose(scores[:, :2], model(x)[:, :2])


def test_a_small_cnn_works_too():
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 6)
    )

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = cnn

        def forward(self, x):
            return self.net(x)

    model = Net()
    slca = SLCA(model, ca_samples=8)
    assert [p.shape for p in slca.param_groups(0.01)[0]["params"]] == [(6, 16), (6,)]
    optimizer = torch.optim.SGD(slca.param_groups(0.01), momentum=0.9)
    for t, classes in enumerate(([0, 1], [2, 3], [4, 5])):
        train_task(model, slca, optimizer, classes, seed=t)
    assert slca.class_covariances.shape == (6, 16, 16)
    assert slca.predict(x=images([0])[0]).shape == (8, 6)


def test_a_head_of_the_wrong_width_and_bad_task_data_are_refused_and_change_nothing():
    model = vit()
    slca = SLCA(model, ca_samples=4)
    optimizer = torch.optim.SGD(slca.param_groups(0.01))
    train_task(model, slca, optimizer, [0, 1])
    state = copy.deepcopy(slca.state_dict())
    weights = copy.deepcopy(model.state_dict())
    x, y = images([2, 3])
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        slca.end_task(named_batches([(x, y), (x, y + 20)]))
    model(x[:3])  # the last forward saw 3 rows, the loss and targets have 8
    with pytest.raises(ValueError, match="SLCA reads the outputs"):
        slca.backward(F.cross_entropy(torch.randn(8, 10, requires_grad=True), y), y, x=x)
    assert testing.state_equal(state, slca.state_dict())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    with pytest.raises(ValueError, match="ca_epochs"):
        SLCA(vit(), ca_epochs=-1)


def test_a_covariance_that_cannot_be_sampled_is_a_clear_error_and_changes_nothing():
    model = vit()
    slca = SLCA(model, covariance_ridge=0.0, ca_samples=4)  # 8 samples in 32 dimensions: singular
    optimizer = torch.optim.SGD(slca.param_groups(0.01))
    train_task(model, slca, optimizer, [0, 1])
    train_task(model, slca, optimizer, [2, 3], seed=1, end=False)
    state, weights = copy.deepcopy(slca.state_dict()), copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="covariance_ridge > 0"):
        slca.end_task(named_batches([images([2, 3], seed=5)]))
    assert testing.state_equal(state, slca.state_dict())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


def test_the_experiment_programs_optimizer_takes_the_slow_learners_groups():
    from synapse.experiments.build import build_optimizer
    from synapse.experiments.config import Config

    model = vit()
    cfg = Config(lr=0.1, weight_decay=5e-4)
    optimizer = build_optimizer(cfg, model, SLCA(model))
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, pytest.approx(0.001)]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [5e-4, 5e-4]
    assert [g["lr"] for g in build_optimizer(cfg, vit()).param_groups] == [0.1]  # no method: one group
