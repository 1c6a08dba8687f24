"""Importance-weighted penalties on the weights (SI, EWC, MAS) and the importances themselves."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["quadratic_penalty", "quadratic_penalty_grad"]


def quadratic_penalty(
    params: Sequence[Tensor], anchors: Sequence[Tensor], importances: Sequence[Tensor], strength: float
) -> Tensor:
    """``strength * sum_k importance_k * (theta_k - anchor_k) ** 2`` over all parameter tensors.

    SI (Zenke et al. 2017, eq. 4) uses ``strength = c``; EWC (Kirkpatrick et al. 2017, eq. 3) writes
    ``lambda / 2 * sum F (theta - theta*)^2``, so ``strength = lambda / 2``; MAS (Aljundi et al. 2018,
    eq. 4) uses ``strength = lambda``.
    """
    total = torch.zeros((), dtype=torch.float32, device=params[0].device)
    for p, a, w in zip(params, anchors, importances):
        total = total + (w * (p - a).square()).sum()
    return strength * total


def quadratic_penalty_grad(
    params: Sequence[Tensor], anchors: Sequence[Tensor], importances: Sequence[Tensor], strength: float
) -> list:
    """The gradient of :func:`quadratic_penalty` with respect to each parameter:
    ``2 strength importance (theta - anchor)``."""
    return [2 * strength * w * (p - a) for p, a, w in zip(params, anchors, importances)]
