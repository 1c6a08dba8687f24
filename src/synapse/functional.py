"""Pure tensor functions behind the methods: reservoir slots, replay losses and gradient projection.

None of them synchronises host and device, so they are safe in the hot path of ``backward``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["reservoir_destinations", "logit_distillation_loss", "project_conflicting_"]


def reservoir_destinations(
    num_seen: int,
    batch: int,
    capacity: int,
    generator: torch.Generator,
    device: torch.device,
    keep: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Where each row of a batch goes under Algorithm R, decided on the device.

    Item ``t`` (0-based over the whole stream) fills slot ``t`` while ``t < capacity``; afterwards it
    draws ``j ~ U{0..t}`` and replaces slot ``j`` if ``j < capacity``. When two rows of the batch pick
    the same slot the later one wins, exactly as one-at-a-time insertion would.

    Returns:
        ``dest``: a slot for every row (losers point at slot 0),
        ``win``: whether the row's value is the one that slot keeps,
        ``slot0_winner``: the row that ends up in slot 0, or -1 if slot 0 keeps its value.
    """
    t = torch.arange(num_seen, num_seen + batch, device=device)
    u = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
    drawn = (u * (t + 1).to(torch.float64)).to(torch.int64).clamp_max(t)
    slot = torch.where(t < capacity, t, drawn)
    writes = slot < capacity
    if keep is not None:
        # A rejected row still fills its reserved slot while the buffer fills, so len() stays honest.
        writes = writes & (keep | (t < capacity))
    same_slot_later = (slot.unsqueeze(1) == slot.unsqueeze(0)) & writes.unsqueeze(0)
    same_slot_later = same_slot_later.triu(diagonal=1)
    win = writes & ~same_slot_later.any(dim=1)
    wins_slot0 = win & (slot == 0)
    rows = torch.arange(batch, device=device)
    slot0_winner = torch.where(wins_slot0, rows, -1).max()
    dest = torch.where(win, slot, 0)
    return dest, win, slot0_winner


def logit_distillation_loss(logits: Tensor, stored: Tensor, widths: Optional[Tensor] = None) -> Tensor:
    """DER's term: mean squared error between current logits and logits stored in the buffer.

    Stored logits may be narrower than today's output (the head grew since they were stored): only the
    columns that existed at insertion are compared. ``widths`` gives each row's stored width when rows
    differ; columns past it are padding and are ignored.
    """
    stored_width = stored.shape[-1]
    if logits.shape[-1] < stored_width:
        raise ValueError(
            f"the model outputs {logits.shape[-1]} logits but the buffer stores {stored_width}: "
            "heads may grow between tasks, not shrink"
        )
    current = logits[..., :stored_width]
    stored = stored.to(current.dtype)
    if widths is None:
        return F.mse_loss(current, stored)
    mask = (torch.arange(stored_width, device=stored.device) < widths.unsqueeze(-1)).to(current.dtype)
    return ((current - stored).square() * mask).sum() / mask.sum().clamp_min(1)


def project_conflicting_(grad: Tensor, reference: Tensor, eps: float = 1e-12) -> Tensor:
    """A-GEM's projection (Chaudhry et al. 2019, eq. 11), in place on the flat ``grad``.

    ``g <- g - (g.r / r.r) r`` when ``g.r < 0``, otherwise ``g`` unchanged. The branch is a clamp, so
    there is no host sync.
    """
    dot = torch.dot(grad, reference)
    coef = dot.clamp(max=0) / torch.dot(reference, reference).clamp_min(eps)
    return grad.addcmul_(reference, coef, value=-1)
