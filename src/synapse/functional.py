"""Pure functions behind the methods: reservoir slots, replay losses and gradient projection.

None of them synchronises host and device, so they are safe in the hot path of ``backward``.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "reservoir_plan",
    "reservoir_draws",
    "last_wins",
    "distinct_subsets",
    "logit_distillation_loss",
    "logit_distillation_grad",
    "project_conflicting_",
]


def reservoir_draws(first: int, uniforms: np.ndarray, capacity: int) -> Tuple[np.ndarray, np.ndarray]:
    """Algorithm R's replacements for the stream items ``first, first + 1, ...`` (one uniform each).

    Item ``t >= capacity`` draws ``j = floor(u_t * (t + 1))``, uniform on ``{0..t}``, and replaces slot
    ``j`` if ``j < capacity`` (float64 keeps this exact far beyond any realistic stream). Items below
    ``capacity`` fill their own slot and are not listed.

    Returns:
        ``(offsets, slots)``: the replacing items as offsets from ``first`` (ascending), and their slots.
    """
    t = first + np.arange(len(uniforms))
    drawn = (uniforms * (t + 1)).astype(np.int64)
    offsets = np.flatnonzero((drawn < capacity) & (t >= capacity))
    return offsets, drawn[offsets]


def last_wins(slots: Iterable[int], rows: Iterable[int]) -> Tuple[List[int], List[int]]:
    """Keep, for each slot written more than once by one batch, only the last row (as sequential
    insertion would); ``rows`` must be in stream order."""
    last = dict(zip(slots, rows))  # a later row overwrites an earlier one's entry
    return list(last), list(last.values())


def reservoir_plan(num_seen: int, batch: int, capacity: int, rng: np.random.Generator) -> Tuple[List[int], List[int]]:
    """Which rows of the next batch enter the reservoir, and where (Algorithm R, vectorised on the host).

    Item ``t`` (0-based over the whole stream) fills slot ``t`` while ``t < capacity``; afterwards it
    replaces a slot as :func:`reservoir_draws` says. When several rows of the batch pick the same slot
    the last one wins, exactly as one-at-a-time insertion would.

    Returns:
        ``(slots, rows)``: distinct slots, and for each the batch row that ends up there.
    """
    filling = min(max(capacity - num_seen, 0), batch)  # rows that take the next free slots
    rows = list(range(filling))
    slots = list(range(num_seen, num_seen + filling))
    if filling == batch:
        return slots, rows
    hits, drawn = reservoir_draws(num_seen + filling, rng.random(batch - filling), capacity)
    return last_wins(slots + drawn.tolist(), rows + (hits + filling).tolist())


def distinct_subsets(rng: np.random.Generator, n: int, k: int, rows: int) -> np.ndarray:
    """``rows`` independent, uniformly random ``k``-subsets of ``range(n)``, as a ``(rows, k)`` array.

    Small ``k`` draws ``k`` integers per row and redraws the rows that repeat one (rejection keeps the
    distribution exactly uniform over subsets, and is cheap while ``k * k <= 2 n``); larger ``k`` takes
    the ``k`` smallest of ``n`` uniforms per row.
    """
    if k == n:
        return rng.permuted(np.broadcast_to(np.arange(n), (rows, n)), axis=1)
    if k * k > 2 * n:
        return np.argpartition(rng.random((rows, n)), k - 1, axis=1)[:, :k]
    picks = rng.integers(0, n, size=(rows, k))
    redo = np.arange(rows)
    while len(redo):
        ordered = np.sort(picks[redo], axis=1)
        redo = redo[(ordered[:, 1:] == ordered[:, :-1]).any(axis=1)]
        picks[redo] = rng.integers(0, n, size=(len(redo), k))
    return picks


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


def project_conflicting_(grad: Tensor, reference: Tensor, eps: float = 1e-12) -> Tensor:
    """A-GEM's projection (Chaudhry et al. 2019, eq. 11), in place on the flat ``grad``.

    ``g <- g - (g.r / r.r) r`` when ``g.r < 0``, otherwise ``g`` unchanged. The branch is a clamp, so
    there is no host sync.
    """
    dot = torch.dot(grad, reference)
    coef = dot.clamp(max=0) / torch.dot(reference, reference).clamp_min(eps)
    return grad.addcmul_(reference, coef, value=-1)
