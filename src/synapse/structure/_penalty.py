"""The importance-weighted quadratic penalty that SI, EWC and MAS share.

``strength * sum_k importance_k * (theta_k - anchor_k) ** 2`` is never built as a graph over all
parameters: its gradient ``2 strength importance (theta - anchor)`` is added to ``.grad`` directly.
Between consolidations the importance and the anchor are fixed, so the gradient is precomputed as
``slope * theta + offset`` (``slope = 2 strength importance``, ``offset = -slope * anchor``), and a step
pays one fused multiply-add over the flat parameters and one ``_foreach_add_``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from .._flat import FlatSpace


class QuadraticPenalty:
    """The penalty's gradient for ``params``, in flat workspaces allocated on their device.

    Call :meth:`refresh` after the importance or the anchor changed; :meth:`add_gradient_` then adds the
    gradient to ``.grad`` at every step (nothing before the first refresh).
    """

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.params = tuple(params)
        self._slope = FlatSpace(self.params)
        self._offset = FlatSpace(self.params)
        self._scratch = FlatSpace(self.params)
        self.active = False

    @property
    def device(self) -> torch.device:
        return self._slope.flat.device

    def refresh(self, importance: Tensor, anchor: Tensor, strength: float) -> None:
        """Precompute the gradient's slope and offset from flat ``importance`` and ``anchor``."""
        if importance.device != self.device:  # the model moved: follow it
            self.__init__(self.params)  # type: ignore[misc]
        torch.mul(importance, 2 * strength, out=self._slope.flat)
        torch.mul(self._slope.flat, anchor, out=self._offset.flat).neg_()
        self.active = strength > 0

    def add_gradient_(self, grads: List[Tensor], theta: Tensor, scale: Optional[Tensor] = None) -> None:
        """``grads += 2 strength importance (theta - anchor)`` (times the GradScaler's ``scale``)."""
        if not self.active:
            return
        gradient = torch.addcmul(self._offset.flat, self._slope.flat, theta, out=self._scratch.flat)
        if scale is not None:
            gradient.mul_(scale)
        torch._foreach_add_(grads, self._scratch.views)
