"""Gradient projections: A-GEM's (and GEM's, with several constraints)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["project_conflicting_"]


def project_conflicting_(grad: Tensor, reference: Tensor, eps: float = 1e-12) -> Tensor:
    """A-GEM's projection (Chaudhry et al. 2019, eq. 11), in place on the flat ``grad``.

    ``g <- g - (g.r / r.r) r`` when ``g.r < 0``, otherwise ``g`` unchanged. The branch is a clamp, so
    there is no host sync.
    """
    dot = torch.dot(grad, reference)
    coef = dot.clamp(max=0) / torch.dot(reference, reference).clamp_min(eps)
    return grad.addcmul_(reference, coef, value=-1)
