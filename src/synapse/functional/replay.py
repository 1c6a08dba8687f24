"""Replay losses: DER's logit matching, with its gradient in closed form; ER-ACE's asymmetric cross-entropy;
iCaRL's binary cross-entropy with distillation targets and its nearest-mean-of-exemplars classifier."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "logit_distillation_loss",
    "logit_distillation_grad",
    "asymmetric_cross_entropy",
    "ace_class_mask",
    "interference_scores",
    "xder_update_logits",
    "head_margin_constraint",
    "icarl_loss",
    "nearest_mean_scores",
]


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


def interference_scores(
    logits_before: Tensor, logits_after: Tensor, targets: Tensor, lowest_loss: Optional[Tensor] = None
) -> Tensor:
    """MIR's retrieval criterion (Aljundi et al. 2019): how much each sample's cross-entropy would rise
    under the foreseen update, ``s(x, y) = CE(f_{theta_v}(x), y) - CE(f_theta(x), y)``, one score per row.

    With ``lowest_loss`` (the MIR authors' ``--compare_to_old_logits``), the rise is measured from the lower
    of today's loss and the lowest one remembered for the sample,
    ``s = CE(f_{theta_v}(x), y) - min(CE(f_theta(x), y), lowest_loss)``: a sample already forgotten scores
    by how far it stands above the best it ever was, not only by what the next step adds.

    Args:
        logits_before: ``(n, classes)``, the model's outputs with its current parameters ``theta``.
        logits_after: ``(n, classes)``, its outputs with the virtually updated parameters ``theta_v``.
        targets: ``(n,)`` class indices.
        lowest_loss: optional ``(n,)``, the lowest cross-entropy remembered for each sample.

    MIR replays the rows with the largest scores (``scores.topk(k)``): those the update would hurt most.
    """
    before = F.cross_entropy(logits_before, targets, reduction="none")
    if lowest_loss is not None:
        before = torch.minimum(before, lowest_loss.to(before.dtype))
    return F.cross_entropy(logits_after, targets, reduction="none") - before


def xder_update_logits(stored: Tensor, new: Tensor, targets: Tensor, columns: Tensor, gamma: float) -> Tensor:
    """X-DER's memory update of stored logits (Boschini et al. 2022): the columns ``M`` (``columns``) of
    each stored row ``z`` are replaced by the model's responses ``o`` on them, scaled down when they
    would outrank the row's ground-truth logit ``z[y]``::

        z[M] <- s * o[M],   s = gamma * z[y] / max_{c in M} o[c]   if max_{c in M} o[c] > z[y],  else 1

    Columns outside ``M`` keep their stored value. With ``z[y] > 0`` the transplanted maximum becomes
    ``gamma * z[y]``, below the true class; for ``z[y] <= 0`` the rule is applied as written (as in the
    authors' code), with no such guarantee. X-DER uses it twice: ``M`` = the newly learned (and future)
    classes' columns of past items, and ``M`` = the past classes' columns of items stored at a task's end
    (then ``stored`` and ``new`` are the same outputs).

    Args:
        stored: ``(batch, classes)`` stored logits ``z``.
        new: ``(batch, classes)`` the model's responses ``o``.
        targets: ``(batch,)`` class indices ``y``.
        columns: bool, ``(classes,)`` or ``(batch, classes)``: the columns ``M`` to transplant.
        gamma: the rescaling factor.

    Returns a new tensor in ``stored``'s dtype (computed in float32); ``stored`` is not modified.
    """
    z, o = stored.float(), new.float()
    truth = z.gather(1, targets.long().unsqueeze(1))
    top = o.masked_fill(~columns, float("-inf")).amax(1, keepdim=True)
    scale = torch.where(top > truth, gamma * truth / top, torch.ones_like(top))
    return torch.where(columns, o * scale, z).to(stored.dtype)


def head_margin_constraint(
    scores: Tensor,
    good: Tensor,
    bad: Tensor,
    margin: float,
    weights: Optional[Tensor] = None,
    detach_bad: bool = False,
) -> Tensor:
    """X-DER's bias constraints between heads: with ``v_r = max_{c in bad_r} s_rc + margin - max_{c in
    good_r} s_rc`` per row, the mean of ``v_r`` over the rows where it is positive (0 when none is)::

        sum_r [v_r > 0] v_r / max(1, sum_r [v_r > 0])

    X-DER's future constraint takes ``scores`` = logits, ``bad`` = the classes not seen yet, ``good`` =
    each row's own task's classes; its past constraint takes ``scores`` = the softmax over the past and
    present classes, ``bad`` = the past classes (``detach_bad``: no gradient through their maximum) and
    ``good`` = the present ones.

    Args:
        scores: ``(rows, classes)``.
        good, bad: bool masks, ``(classes,)`` or ``(rows, classes)``. A row with an empty ``good`` or
            ``bad`` set does not count.
        margin: ``m``.
        weights: optional ``(rows,)``; rows with weight 0 do not count (e.g. a replayed item drawn twice).
        detach_bad: stop the gradient through ``max_{bad}``.

    No host sync: the count of positive rows stays on the device.
    """
    low = torch.finfo(scores.dtype).min
    worst = scores.detach() if detach_bad else scores
    bad_max = worst.masked_fill(~bad, low).max(-1).values
    good_max = scores.masked_fill(~good, low).max(-1).values
    violation = bad_max + margin - good_max
    active = (violation > 0) & bad.any(-1) & good.any(-1)
    if weights is not None:
        active = active & (weights > 0)
    return torch.where(active, violation, torch.zeros_like(violation)).sum() / active.sum().clamp_min(1)


def icarl_loss(
    logits: Tensor,
    targets: Tensor,
    old_logits: Optional[Tensor] = None,
    old_classes: Optional[Tensor] = None,
    classes: Optional[Tensor] = None,
) -> Tensor:
    """iCaRL's classification and distillation loss (Rebuffi et al. 2017, *iCaRL: Incremental Classifier
    and Representation Learning*, Algorithm 3): binary cross-entropy on sigmoid outputs, whose targets
    are the labels for the new classes and the old network's sigmoid outputs for the old ones::

        L = -(1 / (n |S|)) sum_i sum_{y in S} [ t_iy log g_y(x_i) + (1 - t_iy) log(1 - g_y(x_i)) ]
        g = sigmoid(logits),   t_iy = sigmoid(old_logits_iy) if y in O,  else [y == y_i]

    with ``S`` the columns in ``classes`` (the classes seen so far) and ``O`` those in ``old_classes``.
    The paper writes a sum over items and classes; this is its mean over both (as the DER authors' port,
    ``aimagelab/mammoth`` ``models/icarl.py``, takes it), so the scale does not depend on the batch or on
    the number of classes.

    Args:
        logits: ``(n, C)`` the model's outputs.
        targets: ``(n,)`` class indices; a target outside ``[0, C)`` gives a row of zero targets.
        old_logits: ``(n, C')`` with ``C' <= C``, the old network's outputs on the same inputs; None: no
            distillation (every target is the one-hot label).
        old_classes: bool ``(C,)``, the columns ``O`` whose targets come from ``old_logits`` (all False
            beyond ``C'``); needed with ``old_logits``.
        classes: bool ``(C,)``, the columns ``S`` the loss spans; None: all of them. The other columns
            get no gradient.

    No host sync: the class count stays on the device.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    width = logits.shape[1]
    target = (torch.arange(width, device=logits.device) == targets.unsqueeze(1)).to(logits.dtype)
    if old_logits is not None:
        if old_classes is None:
            raise ValueError("icarl_loss needs old_classes with old_logits")
        soft = torch.sigmoid(old_logits.to(logits.dtype))
        if soft.shape[1] < width:  # the head grew since the old network was taken
            soft = F.pad(soft, (0, width - soft.shape[1]))
        target = torch.where(old_classes, soft, target)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if classes is None:
        return bce.mean()
    return torch.where(classes, bce, 0.0).sum() / (classes.sum().clamp_min(1) * logits.shape[0])


def nearest_mean_scores(
    features: Tensor, class_means: Tensor, valid: Optional[Tensor] = None, *, normalize: bool = True
) -> Tensor:
    """iCaRL's nearest-mean-of-exemplars classifier (Rebuffi et al. 2017, Algorithm 1) as class scores:
    ``s_iy = -|| phi(x_i) - mu_y ||``, so that ``argmax_y s_iy = argmin_y || phi(x_i) - mu_y ||``.

    Args:
        features: ``(n, d)`` features ``phi(x)``.
        class_means: ``(C, d)`` one mean feature ``mu_y`` per class.
        valid: bool ``(C,)``: the classes that have a mean; the others score ``-inf``.
        normalize: L2-normalise the features and the means first (the paper's ``phi`` and its
            re-normalised averages).

    Returns ``(n, C)`` float scores. The distances are computed as differences (not through the
    ``|a|^2 + |b|^2 - 2ab`` expansion), so near-equal vectors lose no precision.
    """
    phi, mu = features.float(), class_means.float()
    if normalize:
        phi, mu = F.normalize(phi, dim=1), F.normalize(mu, dim=1)
    scores = torch.cdist(phi, mu, compute_mode="donot_use_mm_for_euclid_dist").neg_()
    return scores if valid is None else scores.masked_fill_(~valid, float("-inf"))
