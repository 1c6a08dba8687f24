"""Replay losses: DER's logit matching, with its gradient in closed form."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["logit_distillation_loss", "logit_distillation_grad"]


def logit_distillation_loss(logits: Tensor, stored: Tensor, widths: Optional[Tensor] = None) -> Tensor:
    """DER's term: mean squared error between current logits and logits stored in the buffer.

    Stored logits may be narrower than today's output (the head grew since they were stored): only the
    columns that existed at insertion are compared. ``widths`` gives each row's stored width when rows
    differ; columns past it are padding and are ignored.
    """
    current, stored, mask = _compared_logits(logits, stored, widths)
    if mask is None:
        return F.mse_loss(current, stored)
    return ((current - stored).square() * mask).sum() / mask.sum().clamp_min(1)


def logit_distillation_grad(
    logits: Tensor, stored: Tensor, widths: Optional[Tensor] = None, weight: float = 1.0
) -> Tensor:
    """The gradient of ``weight * logit_distillation_loss(logits, stored, widths)`` with respect to
    ``logits``, computed directly: ``2 weight (logits - stored) / n`` on the compared entries (``n`` of
    them), zero elsewhere. Fed to backward as the seed of ``logits``, it spares the loss its forward op
    and its node in the graph. The result is detached and new, so the caller may scale it in place.
    """
    current, stored, mask = _compared_logits(logits.detach(), stored, widths)
    diff = torch.sub(current, stored)
    if mask is None:
        diff.mul_(2 * weight / diff.numel())
    else:
        diff.mul_(mask).mul_(2 * weight).div_(mask.sum().clamp_min(1))
    if diff.shape == logits.shape:
        return diff
    grad = logits.new_zeros(logits.shape)
    grad[..., : diff.shape[-1]] = diff
    return grad


def _compared_logits(
    logits: Tensor, stored: Tensor, widths: Optional[Tensor]
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(current, stored, mask)``: the columns of ``logits`` the stored logits cover, the stored logits in
    the same dtype, and a 0/1 mask of the entries that count (None: all of them)."""
    stored_width = stored.shape[-1]
    if logits.shape[-1] < stored_width:
        raise ValueError(
            f"the model outputs {logits.shape[-1]} logits but the buffer stores {stored_width}: "
            "heads may grow between tasks, not shrink"
        )
    current = logits if logits.shape[-1] == stored_width else logits[..., :stored_width]
    if stored.dtype != current.dtype:
        stored = stored.to(current.dtype)
    if widths is None:
        if current.shape != stored.shape:
            raise ValueError(f"logits of shape {tuple(current.shape)} against stored {tuple(stored.shape)}")
        return current, stored, None
    mask = (torch.arange(stored_width, device=stored.device) < widths.unsqueeze(-1)).to(current.dtype)
    return current, stored, mask
