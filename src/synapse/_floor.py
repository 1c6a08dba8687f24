"""Floor steps: each method's irreducible work, hand-written in plain torch, to measure what Synapse adds.

A method's floor is what its training step cannot avoid: its extra forwards and backwards, its losses, its
projections and penalties, with none of a library's bookkeeping (no input validation, no reservoir
insertion, no hooks). Replay draws rows of a buffer of random items, by indices drawn with replacement in
advance. Each method file defines its floor beside the method, as a subclass of :class:`Floor`, and names it
in its ``MethodSpec(floor=...)``; ``benchmarks/step_overhead.py`` times every method against its floor.

Example:
    >>> from synapse import catalog
    >>> spec = catalog.get("der++")
    >>> floor = spec.floor(model, 20, 4, tuple(inputs.shape[1:]), spec.defaults())
    >>> logits = floor.forward(inputs)  # the user's forward, the replay rows riding along
    >>> floor.backward(criterion(logits, targets), targets, inputs, logits)
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import Any, Dict, List, Mapping, Tuple, cast

import torch
from torch import Tensor, nn

from . import _autograd
from ._flat import FlatSpace

__all__ = ["Floor", "PenaltyFloor"]


class Floor(ABC):
    """The shared part of the floors: a buffer of random items, index draws, fused replay, flat workspaces.

    Args:
        model: the model the step trains.
        buffer_size: items in the random buffer.
        minibatch: rows per replay minibatch.
        item: one input's shape, e.g. ``(1, 28, 28)``.
        hparams: the method's hyperparameters (its catalog defaults in the benchmark).

    Subclasses set ``fused`` (replay minibatches that ride in the user's forward, split off into
    ``self.replayed``), override :meth:`rows` where a draw is not one minibatch per replayed term, and write
    :meth:`backward`.
    """

    fused = 0  # replay minibatches concatenated to the user's batch in forward

    def __init__(
        self, model: nn.Module, buffer_size: int, minibatch: int, item: Tuple[int, ...], hparams: Mapping[str, Any]
    ) -> None:
        self.model, self.k, self.hp = model, minibatch, dict(hparams)
        self.params: List[nn.Parameter] = [p for p in model.parameters() if p.requires_grad]
        device = self.params[0].device
        self.one = torch.ones((), device=device)
        g = torch.Generator().manual_seed(1)
        self.classes = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
        self.x = torch.randint(0, 256, (buffer_size, *item), generator=g, dtype=torch.uint8).to(device)
        self.y = torch.randint(0, self.classes, (buffer_size,), generator=g).to(device)
        self.z = torch.randn(buffer_size, self.classes, generator=g).to(device)
        self.blocks = torch.randint(0, buffer_size, (64, self.rows()), generator=g).to(device).unbind(0)
        self.step = 0
        self.replayed: List[Tensor] = []
        self._spaces: Dict[str, FlatSpace] = {}
        self._weights: Dict[str, Tensor] = {}

    def rows(self) -> int:
        """Buffer rows per draw: a minibatch per fused term (one when none is fused)."""
        return max(self.fused, 1) * self.k

    def grads(self) -> List[Tensor]:
        """The parameters' ``.grad`` after a backward (every floor's loss reaches them all)."""
        return [cast(Tensor, p.grad) for p in self.params]

    def gradient_of(self, loss: Tensor) -> List[Tensor]:
        """``d loss / d params``, without touching ``.grad``."""
        return [cast(Tensor, g) for g in _autograd.grad(loss, self.one, self.params)]

    def draw(self) -> Tensor:
        """The next block of buffer indices (drawn in advance, so no step samples)."""
        idx = self.blocks[self.step % len(self.blocks)]
        self.step += 1
        return idx

    def space(self, name: str) -> FlatSpace:
        """A flat workspace shaped like the parameters, made once."""
        if name not in self._spaces:
            self._spaces[name] = FlatSpace(self.params)
        return self._spaces[name]

    def weight(self, name: str) -> Tensor:
        """Hyperparameter ``name`` as a 0-dim tensor on the device, made once (a seed for the backward)."""
        if name not in self._weights:
            self._weights[name] = torch.full((), float(self.hp[name]), device=self.one.device)
        return self._weights[name]

    def teacher(self) -> nn.Module:
        """A frozen copy of the model (the old model of the distillation methods), made once."""
        if not hasattr(self, "_teacher"):
            self._teacher = copy.deepcopy(self.model).requires_grad_(False)
        return self._teacher

    def forward(self, x: Tensor) -> Tensor:
        """The user's forward; with ``fused`` replay, the drawn rows ride along and are kept in ``replayed``."""
        if not self.fused:
            return self.model(x)
        self.idx = self.draw()
        out = self.model(torch.cat([x, self.x.index_select(0, self.idx)]))
        user, *self.replayed = out.split([x.shape[0], *[self.k] * self.fused])
        return user

    @abstractmethod
    def backward(self, loss: Tensor, targets: Tensor, inputs: Tensor, logits: Tensor) -> None:
        """The method's irreducible work for one step, leaving the gradients in ``.grad``."""

    # Backward passes use Synapse's seeded backward, the cheapest way into autograd this code knows.
    def run_backward(self, roots: Tuple[Tensor, ...], seeds: Tuple[Tensor, ...]) -> None:
        _autograd.backward(roots, seeds)


class PenaltyFloor(Floor):
    """The floor of a quadratic penalty with fixed importance between task ends (EWC, MAS): the user's
    backward, then the penalty's gradient ``slope * theta + offset`` (one fused multiply-add over the flat
    parameters) added to the gradients."""

    def backward(self, loss: Tensor, targets: Tensor, inputs: Tensor, logits: Tensor) -> None:
        self.run_backward((loss,), (self.one,))
        theta, gradient = self.space("theta"), self.space("gradient")
        torch._foreach_copy_(theta.views, [p.detach() for p in self.params])
        torch.addcmul(self.space("offset").flat, self.space("slope").flat, theta.flat, out=gradient.flat)
        torch._foreach_add_(self.grads(), gradient.views)
