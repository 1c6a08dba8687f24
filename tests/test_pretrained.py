"""The methods on pretrained backbones (synapse.pretrained): the invariants of issue 24's table.

SimpleCIL and RanPAC: the streamed statistics equal the batch closed form computed from an independent
forward, the random projection stays fixed, the backbone's weights do not move and no backward pass runs,
and any model whose head is an ``nn.Linear`` works (a timm ViT or a plain MLP).
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from synapse import testing
from synapse.pretrained import RanPAC, SimpleCIL
from synapse.pretrained._backbone import find_head
from synapse.pretrained._ridge import held_out_error, ridge_grid_search, ridge_solve
from synapse.pretrained.ranpac import RIDGE_GRID

pytest.importorskip("timm")


def vit():
    torch.manual_seed(0)
    return testing.toy_vit()


def pre_logits(model, x):
    """The ViT's pre-logits, computed by timm itself (not through the method's hook)."""
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def run(method, model, batches, task_length=None):
    for i, (x, y) in enumerate(batches):
        method.backward(F.cross_entropy(model(x), y), y, x=x)
        if task_length and (i + 1) % task_length == 0:
            method.end_task()


def test_the_head_and_its_features_are_read_from_the_model():
    model = vit()
    assert find_head(model) is model.head
    mlp = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    assert find_head(mlp) is mlp[2]
    headless = testing.toy_vit(classes=0)
    before = [p.requires_grad for p in headless.parameters()]
    with pytest.raises(ValueError, match="num_classes"):
        SimpleCIL(headless)
    assert [p.requires_grad for p in headless.parameters()] == before  # refused before freezing anything


@pytest.mark.parametrize("cls", [SimpleCIL, RanPAC])
def test_the_backbone_is_frozen_and_no_backward_pass_runs(cls):
    model = vit()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    method = cls(model, **({"projection_dim": 16} if cls is RanPAC else {}))
    assert method.trainable_parameters() == []
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run(method, model, testing.toy_images(4, batch=10), task_length=2)
    optimizer.step()
    assert all(p.grad is None for p in model.parameters())  # the user's loss was not backpropagated
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_simplecil_streamed_prototypes_equal_the_batch_class_means():
    model = vit()
    method = SimpleCIL(model)
    batches = testing.toy_images(5, batch=12)
    run(method, model, batches, task_length=2)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    features = pre_logits(model.eval(), x)
    for c in range(10):
        rows = features[y == c]
        expected = rows.mean(0) if len(rows) else torch.zeros(features.shape[1])
        torch.testing.assert_close(method.prototypes[c], expected, rtol=1e-5, atol=1e-6)
        assert method.class_counts[c] == len(rows)


def test_simplecil_predicts_the_cosine_to_the_prototypes_and_minus_inf_for_unseen_classes():
    model = vit()
    method = SimpleCIL(model)
    x, y = testing.toy_images(1, batch=16)[0]
    y = y % 6  # classes 6..9 never seen
    run(method, model, [(x, y)])
    scores = method.predict(x=x)
    features = pre_logits(model, x)
    expected = F.normalize(features, dim=1) @ F.normalize(method.prototypes[:6], dim=1).T
    torch.testing.assert_close(scores[:, :6], expected, rtol=1e-5, atol=1e-6)
    assert torch.isinf(scores[:, 6:]).all() and (scores[:, 6:] < 0).all()


def test_ranpac_streamed_gram_and_class_features_equal_the_batch_closed_form():
    model = vit()
    method = RanPAC(model, projection_dim=48)
    projection = method.projection.clone()
    batches = testing.toy_images(6, batch=10)
    run(method, model, batches, task_length=3)
    assert torch.equal(method.projection, projection)  # fixed across steps and task ends
    assert abs(float(projection.std()) - 1.0) < 0.1 and abs(float(projection.mean())) < 0.1  # N(0, 1) entries
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    h = torch.relu(pre_logits(model.eval(), x) @ projection)
    one_hot = F.one_hot(y, 10).float()
    held = torch.zeros(len(y), dtype=torch.bool)  # the last 10 // 5 = 2 rows of each batch
    for b in range(6):
        held[b * 10 + 8 : b * 10 + 10] = True
    torch.testing.assert_close(method.gram, h[~held].T @ h[~held], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(method.held_out_gram, h[held].T @ h[held], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(method.class_features, one_hot[~held].T @ h[~held], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(method.held_out_class_features, one_hot[held].T @ h[held], rtol=1e-4, atol=1e-3)
    # The classifier: the ridge solve on every row, at the chosen lambda, in float64.
    ridge = method.chosen_ridge
    assert ridge in RIDGE_GRID
    hd, yd = h.double(), one_hot.double()
    expected = torch.linalg.solve(hd.T @ hd + ridge * torch.eye(48, dtype=torch.float64), hd.T @ yd).T
    torch.testing.assert_close(method.weights.double(), expected, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(method.predict(x=x), (h @ method.weights.T), rtol=1e-4, atol=1e-4)


def test_ridge_grid_search_picks_the_least_held_out_error_of_explicit_solves():
    g = torch.Generator().manual_seed(3)
    h = torch.relu(torch.randn(60, 20, generator=g, dtype=torch.float64))
    y = F.one_hot(torch.randint(0, 4, (60,), generator=g), 4).double()
    fit, val = slice(0, 45), slice(45, 60)
    grid = [10.0**k for k in range(-4, 5)]
    errors = []
    for r in grid:
        w = torch.linalg.solve(h[fit].T @ h[fit] + r * torch.eye(20, dtype=torch.float64), h[fit].T @ y[fit]).T
        errors.append(float(((h[val] @ w.T - y[val]) ** 2).sum()))
        # held_out_error is the squared error less the constant sum ||y||^2
        gram_v, class_v = h[val].T @ h[val], y[val].T @ h[val]
        assert math.isclose(
            float(held_out_error(w, gram_v, class_v)) + float((y[val] ** 2).sum()), errors[-1], rel_tol=1e-9
        )
        assert torch.allclose(ridge_solve(h[fit].T @ h[fit], y[fit].T @ h[fit], r), w)
    assert len(set(errors)) > 1  # the grid matters on this problem
    chosen = ridge_grid_search(h[fit].T @ h[fit], y[fit].T @ h[fit], h[val].T @ h[val], y[val].T @ h[val], grid)
    assert chosen == grid[errors.index(min(errors))]


def test_a_fixed_ridge_keeps_no_held_out_statistics():
    model = vit()
    method = RanPAC(model, projection_dim=16, ridge=10.0)
    run(method, model, testing.toy_images(2, batch=10), task_length=2)
    assert method.held_out_gram.numel() == 0 and method.chosen_ridge == 10.0
    assert method.class_counts.sum() == 20


def test_ranpac_warns_once_without_held_out_rows():
    model = vit()
    method = RanPAC(model, projection_dim=16)
    with pytest.warns(UserWarning, match="no rows were held out"):
        run(method, model, testing.toy_images(2, batch=4), task_length=1)
    assert method.chosen_ridge == 1.0


@pytest.mark.parametrize("cls", [SimpleCIL, RanPAC])
def test_any_model_with_a_linear_head_learns_new_classes_without_forgetting(cls):
    # Features are the inputs (the head is the model's only layer): four Gaussian classes, two per task.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    method = cls(model, **({"projection_dim": 256} if cls is RanPAC else {}))
    centres = torch.randn(4, 8) * 3
    g = torch.Generator().manual_seed(1)

    def batch(classes):
        y = torch.tensor(classes)[torch.randint(0, 2, (20,), generator=g)]
        return centres[y] + torch.randn(20, 8, generator=g), y

    for task in ([0, 1], [2, 3]):
        for _ in range(5):
            x, y = batch(task)
            method.backward(F.cross_entropy(model(x), y), y, input=x)
        method.end_task()
    x, y = batch([0, 1])
    x2, y2 = batch([2, 3])
    accuracy = (method.predict(input=torch.cat([x, x2])).argmax(1) == torch.cat([y, y2])).float().mean()
    assert accuracy > 0.9, accuracy


@pytest.mark.parametrize("cls", [SimpleCIL, RanPAC])
def test_backward_without_a_fresh_forward_is_refused(cls):
    model = vit()
    method = cls(model, **({"projection_dim": 16} if cls is RanPAC else {}))
    x, y = testing.toy_images(1)[0]
    loss = F.cross_entropy(model(x), y)
    method.backward(loss, y, x=x)
    before = method.state_dict()
    with pytest.raises(ValueError, match="no forward"):
        method.backward(loss, y, x=x)
    with pytest.raises(ValueError, match="class indices"):
        method.backward(F.cross_entropy(model(x), y), y + 10, x=x)
    assert testing.state_equal(method.state_dict(), before)



def test_ranpac_predict_between_task_ends_warns_once_that_the_classifier_is_stale():
    model = vit()
    method = RanPAC(model, projection_dim=16, ridge=1.0)
    (x, y), (x2, y2) = testing.toy_images(2, batch=8)
    method.backward(F.cross_entropy(model(x), y), y, x=x)
    with pytest.warns(UserWarning, match=r"solved at end_task\(\), and the 1 steps since the last one"):
        method.predict(x=x)
    method.end_task()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method.predict(x=x)  # solved on every step: silent
        method.backward(F.cross_entropy(model(x2), y2), y2, x=x2)
        method.predict(x=x2)  # stale again, but said once


@pytest.mark.parametrize("name", ["simplecil", "ranpac", "l2p", "dualprompt", "coda-prompt", "slca"])
@pytest.mark.parametrize("width", [10, 12])
def test_a_head_replaced_after_the_method_was_built_is_named_at_the_next_step(name, width):
    from synapse import catalog

    spec = catalog.get(name)
    model = vit()
    method = spec.create(model, spec.harness_hparams)
    x, y = testing.toy_images(1)[0]
    model.reset_classifier(width)  # a new layer, of the same width or wider
    before = method.state_dict()
    with pytest.raises(ValueError, match=rf"built on the model's head of 10 outputs, .* now another layer \({width} "):
        method.backward(F.cross_entropy(model(x), y), y, x=x)
    assert testing.state_equal(method.state_dict(), before)
