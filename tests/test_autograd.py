"""Synapse's seeded backward equals PyTorch's public one, on plain tensors and on subclasses."""

import torch

from synapse import _autograd


class Tagged(torch.Tensor):
    """A do-nothing subclass: it must take the public path and still get the same gradients."""


def graph(w: torch.Tensor):
    x = torch.arange(6.0).view(2, 3)
    out = x @ w
    return out.square().mean(), out.sum()


def test_backward_matches_torch_for_several_weighted_roots():
    w_ours = torch.randn(3, 2, requires_grad=True)
    w_ref = w_ours.detach().clone().requires_grad_()
    roots = graph(w_ours)
    _autograd.backward(roots, [torch.ones(()), torch.full((), 0.3)])
    torch.autograd.backward(graph(w_ref), [torch.ones(()), torch.full((), 0.3)])
    assert torch.equal(w_ours.grad, w_ref.grad)


def test_grad_matches_torch_and_reports_unused_inputs_as_none():
    w = torch.randn(3, 2, requires_grad=True)
    unused = torch.zeros(4, requires_grad=True)
    ours = _autograd.grad(graph(w)[0], torch.ones(()), [w, unused])
    reference = torch.autograd.grad(graph(w)[0], [w, unused], allow_unused=True)
    assert torch.equal(ours[0], reference[0]) and ours[1] is None and w.grad is None


def test_tensor_subclasses_take_the_public_path():
    w = torch.randn(3, 2, requires_grad=True)
    loss = graph(w)[0].as_subclass(Tagged)
    assert type(loss) is Tagged
    _autograd.backward([loss], [torch.ones(())])
    expected = torch.autograd.grad(graph(w)[0], w)[0]
    assert torch.allclose(w.grad, expected)
