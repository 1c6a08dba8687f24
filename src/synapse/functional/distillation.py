"""Distillation losses on the outputs: matching an earlier model's softened predictions."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .replay import asymmetric_cross_entropy

__all__ = ["soft_distillation_loss", "soft_distillation_grad", "bias_correction", "bic_lambda", "bic_loss"]


def soft_distillation_loss(
    logits: Tensor, teacher_logits: Tensor, temperature: float = 2.0, class_mask: Optional[Tensor] = None
) -> Tensor:
    """Knowledge distillation as in Learning without Forgetting (Li & Hoiem 2016, eq. 2): the
    cross-entropy between the teacher's and the student's temperature-softened distributions over the
    masked classes, averaged over the batch::

        p = softmax_M(teacher_logits / T),  q = softmax_M(logits / T),  loss = -mean_b sum_{j in M} p_j log q_j

    where ``softmax_M`` normalises over the classes in ``M`` only (the others are left out of both
    distributions). No ``T**2`` factor (the paper has none).

    Args:
        logits: the student's logits, ``(batch, C)``; with ``C`` wider than the teacher's (a head that
            grew since), only the teacher's first columns are compared.
        teacher_logits: ``(batch, C_t)`` with ``C_t <= C``.
        temperature: ``T > 0``.
        class_mask: the distilled classes, ``(C_t,)``: bool (True = distilled), or the same mask in
            additive form, a float tensor of 0 (distilled) and ``-inf``. None: all ``C_t`` classes. It must
            keep at least one class, or the result is NaN.
    """
    student, teacher, log_mask = _compared(logits, teacher_logits, class_mask)
    log_q = torch.log_softmax(_softened(student, temperature, log_mask), dim=-1)
    p = torch.softmax(_softened(teacher, temperature, log_mask), dim=-1)
    terms = p * log_q
    if log_mask is not None:  # left-out classes give 0 * -inf: they contribute nothing
        terms = terms.masked_fill(torch.isinf(log_mask), 0.0)
    return -terms.sum(dim=-1).mean()


def soft_distillation_grad(
    logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 2.0,
    class_mask: Optional[Tensor] = None,
    weight: float = 1.0,
) -> Tensor:
    """The gradient of ``weight * soft_distillation_loss(logits, teacher_logits, temperature, class_mask)``
    with respect to ``logits``, in closed form: ``weight (q - p) / (batch T)`` on the compared classes
    (``q``, ``p`` as in :func:`soft_distillation_loss`), zero on the others and on the columns past the
    teacher's. Fed to backward as the seed of ``logits``, it spares the loss its softmax graph. Computed in
    float32 (or wider), returned in ``logits``' dtype, detached and new: the caller may scale it in place.
    """
    student, teacher, log_mask = _compared(logits.detach(), teacher_logits, class_mask)
    q = torch.softmax(_softened(student, temperature, log_mask), dim=-1)
    q.sub_(torch.softmax(_softened(teacher, temperature, log_mask), dim=-1))
    q.mul_(weight / (max(logits.shape[0], 1) * temperature))
    grad = q.to(logits.dtype)
    if grad.shape == logits.shape:
        return grad
    padded = logits.new_zeros(logits.shape)
    padded[:, : grad.shape[1]] = grad
    return padded


def _softened(logits: Tensor, temperature: float, log_mask: Optional[Tensor]) -> Tensor:
    """``logits / T`` (plus the additive mask), new, in float32 or wider."""
    if log_mask is not None:  # one op: log_mask + logits / T, promoted to the mask's float32
        return torch.add(log_mask, logits, alpha=1.0 / temperature)
    return torch.mul(logits.to(torch.promote_types(logits.dtype, torch.float32)), 1.0 / temperature)


def _compared(
    logits: Tensor, teacher_logits: Tensor, class_mask: Optional[Tensor]
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(student, teacher, log_mask)``: the student's columns the teacher covers, the teacher's logits,
    and the class mask in additive float form (0 / -inf), or None."""
    if logits.dim() != 2 or teacher_logits.dim() != 2 or logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(
            f"logits {tuple(logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} must be "
            "(batch, classes) with the same batch"
        )
    width = teacher_logits.shape[1]
    if logits.shape[1] < width:
        raise ValueError(
            f"the student outputs {logits.shape[1]} logits but the teacher {width}: heads may grow, not shrink"
        )
    student = logits if logits.shape[1] == width else logits[:, :width]
    if class_mask is None:
        return student, teacher_logits, None
    if class_mask.shape != (width,):
        raise ValueError(f"class_mask must have shape ({width},), the teacher's classes, got {tuple(class_mask.shape)}")
    if class_mask.dtype == torch.bool:
        wide = torch.promote_types(logits.dtype, torch.float32)
        class_mask = torch.zeros(width, dtype=wide, device=class_mask.device).masked_fill_(~class_mask, float("-inf"))
    elif not class_mask.is_floating_point():
        raise TypeError(f"class_mask must be bool or an additive float mask, got dtype {class_mask.dtype}")
    return student, teacher_logits, class_mask


def bias_correction(logits: Tensor, new_classes: Tensor, alpha: float | Tensor, beta: float | Tensor) -> Tensor:
    """BiC's bias correction layer (Wu et al. 2019, *Large Scale Incremental Learning*, eq. 4): one affine
    map, shared by the new classes, on their logits; the old classes' logits pass unchanged::

        q_k = alpha * o_k + beta   (k a new class),     q_k = o_k   (k an old class)

    Args:
        logits: ``(batch, classes)``.
        new_classes: bool ``(classes,)``: the columns the layer corrects.
        alpha, beta: the layer's two parameters, numbers or 0-d tensors (gradients flow into tensors:
            stage 2 trains them).
    """
    return torch.where(new_classes, logits * alpha + beta, logits)


def bic_lambda(old_classes: Tensor, seen_classes: Tensor) -> Tensor:
    """BiC's weight of the distillation term, ``lambda = n / (n + m)`` (Wu et al. 2019, Sec. 3) with ``n``
    the old classes and ``n + m`` all the classes seen, counted from bool ``(classes,)`` masks on their
    device (no host sync). ``old_classes`` must be a subset of ``seen_classes``, which must not be empty."""
    return old_classes.sum().to(torch.float32) / seen_classes.sum().to(torch.float32)


def bic_loss(
    logits: Tensor,
    targets: Tensor,
    teacher_logits: Optional[Tensor],
    old_classes: Optional[Tensor],
    seen_classes: Tensor,
    temperature: float = 2.0,
) -> Tensor:
    """BiC's stage-1 loss (Wu et al. 2019, eqs. 1-3), the mean over the rows::

        L = lambda * L_d + (1 - lambda) * L_c,                lambda = n / (n + m)
        L_d = -mean_x sum_{k in old} pi_hat_k(x) log pi_k(x),  pi = softmax_old(o / T), pi_hat = softmax_old(o_hat / T)
        L_c = -mean_x log softmax_seen(o)_y

    ``o`` are ``logits``, ``o_hat`` the old model's ``teacher_logits``, ``softmax_old`` normalises over the
    ``n`` old classes and ``softmax_seen`` over the ``n + m`` classes seen (the other columns are left
    out). ``L_d`` is :func:`soft_distillation_loss` (no ``T**2`` factor: the paper has none), ``L_c``
    :func:`~synapse.functional.asymmetric_cross_entropy` over the seen classes. Without a teacher (the
    first task: ``teacher_logits`` and ``old_classes`` None) ``n = 0`` and ``L = L_c``.

    Args:
        logits: ``(batch, classes)``, the model's (bias-corrected) logits.
        targets: ``(batch,)`` class indices, each a seen class.
        teacher_logits: ``(batch, classes)``, the old model's (bias-corrected) logits, or None.
        old_classes: bool ``(classes,)``, the ``n`` old classes (a non-empty subset of the seen ones), or None.
        seen_classes: bool ``(classes,)``, the ``n + m`` classes seen.
        temperature: ``T > 0``.
    """
    classification = asymmetric_cross_entropy(logits, targets, seen_classes)
    if teacher_logits is None:
        return classification
    if old_classes is None:
        raise ValueError("bic_loss needs old_classes with teacher_logits")
    lam = bic_lambda(old_classes, seen_classes)
    distillation = soft_distillation_loss(logits, teacher_logits, temperature, old_classes)
    return torch.lerp(classification, distillation.to(classification.dtype), lam.to(classification.dtype))
