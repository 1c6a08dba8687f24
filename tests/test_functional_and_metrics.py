import math

import pytest
import torch

from synapse import metrics
from synapse.functional import logit_distillation_grad, logit_distillation_loss, project_conflicting_

R = [
    [0.9, 0.1, 0.0],
    [0.6, 0.8, 0.2],
    [0.5, 0.7, 0.9],
]


def test_average_accuracy():
    assert metrics.average_accuracy(R) == pytest.approx((0.5 + 0.7 + 0.9) / 3)


def test_average_incremental_accuracy():
    assert metrics.average_incremental_accuracy(R) == pytest.approx((0.9 + (0.6 + 0.8) / 2 + (0.5 + 0.7 + 0.9) / 3) / 3)


def test_forgetting_uses_the_best_earlier_accuracy():
    # task 0: best 0.9 -> 0.5 (0.4); task 1: best 0.8 -> 0.7 (0.1)
    assert metrics.forgetting(R) == pytest.approx((0.4 + 0.1) / 2)


def test_backward_transfer():
    assert metrics.backward_transfer(R) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)


def test_forward_transfer():
    b = [0.1, 0.05, 0.3]
    assert metrics.forward_transfer(R, b) == pytest.approx(((0.1 - 0.05) + (0.2 - 0.3)) / 2)


def test_single_task_and_bad_shapes():
    assert metrics.forgetting([[0.7]]) == 0.0
    assert metrics.backward_transfer([[0.7]]) == 0.0
    with pytest.raises(ValueError, match="square"):
        metrics.average_accuracy([[0.1, 0.2]])
    with pytest.raises(ValueError, match="one entry per task"):
        metrics.forward_transfer(R, [0.1])


def test_projection_removes_the_conflicting_component():
    g = torch.tensor([1.0, -2.0])
    r = torch.tensor([0.0, 1.0])  # g.r = -2 < 0
    project_conflicting_(g, r)
    assert g.tolist() == [1.0, 0.0]


def test_projection_leaves_agreeing_gradients_alone():
    g = torch.tensor([1.0, 2.0])
    project_conflicting_(g, torch.tensor([1.0, 1.0]))
    assert g.tolist() == [1.0, 2.0]


def test_projection_matches_formula_in_general():
    torch.manual_seed(0)
    g, r = torch.randn(50), torch.randn(50)
    if torch.dot(g, r) > 0:
        r = -r
    expected = g - torch.dot(g, r) / torch.dot(r, r) * r
    projected = project_conflicting_(g.clone(), r)
    assert torch.allclose(projected, expected, atol=1e-6)
    assert abs(torch.dot(projected, r).item()) < 1e-4


def test_projection_with_zero_reference_is_identity():
    g = torch.tensor([1.0, -1.0])
    assert project_conflicting_(g.clone(), torch.zeros(2)).tolist() == [1.0, -1.0]


def test_logit_distillation_is_mse():
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])
    assert logit_distillation_loss(a, b).item() == pytest.approx(2.5)


def test_logit_distillation_with_grown_head_compares_old_columns_only():
    current = torch.tensor([[1.0, 2.0, 100.0]])
    stored = torch.tensor([[0.0, 0.0]])
    assert logit_distillation_loss(current, stored).item() == pytest.approx(2.5)


def test_logit_distillation_masks_rows_per_width():
    current = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    stored = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    widths = torch.tensor([1, 3])
    # row 0 compares 1 column (1), row 1 three (4 each): (1 + 12) / 4
    assert logit_distillation_loss(current, stored, widths).item() == pytest.approx(13 / 4)


def test_logit_distillation_rejects_a_shrunk_head():
    with pytest.raises(ValueError, match="shrink"):
        logit_distillation_loss(torch.zeros(1, 2), torch.zeros(1, 3))
    assert math.isfinite(logit_distillation_loss(torch.zeros(1, 3), torch.zeros(1, 3)).item())


@pytest.mark.parametrize(
    "current_width, stored_width, widths",
    [(4, 4, None), (6, 4, None), (6, 6, [2, 6, 4])],
    ids=["same width", "grown head", "rows of different widths"],
)
def test_logit_distillation_grad_is_the_gradient_of_the_weighted_loss(current_width, stored_width, widths):
    g = torch.Generator().manual_seed(0)
    current = torch.randn(3, current_width, generator=g, dtype=torch.float64, requires_grad=True)
    stored = torch.randn(3, stored_width, generator=g, dtype=torch.float64)
    widths = None if widths is None else torch.tensor(widths)
    (expected,) = torch.autograd.grad(0.3 * logit_distillation_loss(current, stored, widths), current)
    got = logit_distillation_grad(current, stored, widths, weight=0.3)
    assert not got.requires_grad
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-15)
