"""Replay losses: DER's logit matching, with its gradient in closed form; ER-ACE's asymmetric cross-entropy."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["logit_distillation_loss", "logit_distillation_grad", "asymmetric_cross_entropy", "ace_class_mask"]


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


def asymmetric_cross_entropy(logits: Tensor, targets: Tensor, class_mask: Tensor) -> Tensor:
    """ER-ACE's loss on the incoming batch: the mean cross-entropy with the softmax taken over the columns
    ``class_mask`` allows only, ``-mean_i log( exp(z_i[y_i]) / sum_{c in C} exp(z_i[c]) )``.

    Args:
        logits: ``(batch, classes)``.
        targets: ``(batch,)`` class indices; each must be an allowed column.
        class_mask: bool, ``(classes,)`` or ``(batch, classes)``: the columns ``C`` the softmax normalises over.

    The excluded logits are replaced by the dtype's most negative finite value, so they add nothing to the
    normaliser and receive no gradient.
    """
    return F.cross_entropy(logits.where(class_mask, torch.finfo(logits.dtype).min), targets)


def ace_class_mask(
    targets: Tensor,
    num_classes: int,
    largest_seen: Optional[Tensor] = None,
    classes: Optional[Tensor] = None,
) -> Tensor:
    """The columns ER-ACE's incoming term normalises over, as a bool ``(num_classes,)`` mask: the classes
    present in ``targets`` (together with ``classes``, a bool mask, when given), and every class from
    ``largest_seen`` (a 0-d index tensor; ``targets.max()`` when None) upward, i.e. those not seen yet.

    Built on the device with no host sync: no ``unique``, no ``nonzero``.
    """
    if largest_seen is None:
        largest_seen = targets.max()
    arange = torch.arange(num_classes, device=targets.device)
    allowed = torch.ge(arange, largest_seen).index_fill_(0, targets.long(), True)
    return allowed if classes is None else allowed.logical_or_(classes)
