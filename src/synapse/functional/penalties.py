"""Importance-weighted penalties on the weights (SI, EWC, MAS) and the importances themselves.

The importances take *per-sample* gradients, stacked along dim 0 (``torch.func.vmap`` of ``grad`` gives
them in this form), and reduce over the samples: ``reduction='mean'`` is the paper's estimate,
``'sum'`` lets a pass over many batches add them up and divide once by the total count.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "quadratic_penalty",
    "quadratic_penalty_grad",
    "empirical_fisher_diagonal",
    "true_fisher_diagonal",
    "mas_importance",
    "running_average_importance",
    "merge_quadratic_penalties",
]

REDUCTIONS = ("mean", "sum")


def quadratic_penalty(
    params: Sequence[Tensor], anchors: Sequence[Tensor], importances: Sequence[Tensor], strength: float
) -> Tensor:
    """``strength * sum_k importance_k * (theta_k - anchor_k) ** 2`` over all parameter tensors.

    SI (Zenke et al. 2017, eq. 4) uses ``strength = c``; EWC (Kirkpatrick et al. 2017, eq. 3) writes
    ``lambda / 2 * sum F (theta - theta*)^2``, so ``strength = lambda / 2`` (which is what
    :class:`~synapse.structure.EWC`'s ``ewc_lambda`` is, as Mammoth's ``e_lambda``); MAS (Aljundi et al.
    2018, eq. 4) uses ``strength = lambda``.
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


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    return per_sample.mean(0) if reduction == "mean" else per_sample.sum(0)


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def empirical_fisher_diagonal(per_sample_grads: Sequence[Tensor], reduction: str = "mean") -> List[Tensor]:
    """The diagonal empirical Fisher ``F = 1/N sum_n g_n ** 2``, one tensor per parameter.

    Args:
        per_sample_grads: for each parameter, ``g_n = d log p(y_n | x_n) / d theta`` for every sample
            ``n``, shape ``(N, *param.shape)``: the gradient of the log-likelihood of the *true* label.
        reduction: ``'mean'`` (the estimate) or ``'sum'`` (``N F``).
    """
    _check_reduction(reduction)
    return [_reduce(g.square(), reduction) for g in per_sample_grads]


def true_fisher_diagonal(per_class_grads: Sequence[Tensor], probs: Tensor, reduction: str = "mean") -> List[Tensor]:
    """The diagonal Fisher information ``F = 1/N sum_n sum_c p(c | x_n) g_nc ** 2``, its expectation over
    the model's own predictive distribution computed exactly (no sampled labels).

    Args:
        per_class_grads: for each parameter, ``g_nc = d log p(c | x_n) / d theta``, shape
            ``(N, C, *param.shape)``.
        probs: ``p(c | x_n)``, shape ``(N, C)``.
        reduction: ``'mean'`` (the estimate) or ``'sum'`` (``N F``).
    """
    _check_reduction(reduction)
    out = []
    for g in per_class_grads:
        weights = probs.reshape(*probs.shape, *([1] * (g.dim() - 2))).to(g.dtype)
        out.append(_reduce((weights * g.square()).sum(1), reduction))
    return out


def mas_importance(per_sample_grads: Sequence[Tensor], reduction: str = "mean") -> List[Tensor]:
    """MAS's importance ``Omega = 1/N sum_n |g_n|`` (Aljundi et al. 2018, eq. 2).

    Args:
        per_sample_grads: for each parameter, ``g_n = d ||f(x_n)||_2^2 / d theta`` (eq. 3), shape
            ``(N, *param.shape)``, with ``f`` the model's output (the logits, before any softmax).
        reduction: ``'mean'`` (eq. 2) or ``'sum'`` (``N Omega``).
    """
    _check_reduction(reduction)
    return [_reduce(g.abs(), reduction) for g in per_sample_grads]


def running_average_importance(
    previous: Sequence[Tensor], new: Sequence[Tensor], alpha: float, first: bool = False
) -> List[Tensor]:
    """The importance after a task end under a running average: ``alpha * previous + (1 - alpha) * new``,
    or ``new`` alone at the first task end (``first``).

    Avalanche's ``MASPlugin`` (after FACIL's MAS) folds each task's importance in this way, where the MAS
    paper's authors add it (``previous + new``), so that the importance stays a weighted mean of the
    tasks' importances rather than growing with their number.

    Args:
        previous: the running importance, one tensor per parameter.
        new: the finished task's importance, one tensor per parameter.
        alpha: the weight of the running importance, in ``[0, 1]``.
        first: whether this is the first task end (``previous`` is then ignored).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if len(previous) != len(new):
        raise ValueError(f"need as many new importances as previous ones, got {len(new)} and {len(previous)}")
    if first:
        return [n.clone() for n in new]
    return [alpha * p + (1.0 - alpha) * n for p, n in zip(previous, new)]


def merge_quadratic_penalties(
    importances: Sequence[Sequence[Tensor]], anchors: Sequence[Sequence[Tensor]]
) -> Tuple[List[Tensor], List[Tensor]]:
    """One quadratic with the same gradient as a sum of them: ``sum_t F_t (theta - theta_t) ** 2``.

    ``sum_t F_t (theta - theta_t)^2 = S theta^2 - 2 theta sum_t F_t theta_t + const`` with
    ``S = sum_t F_t``, so its gradient is that of ``S (theta - a)^2`` with
    ``a = sum_t F_t theta_t / S``. Where ``S = 0`` no term pulls and ``a`` is set to 0.
    Only the constant (the penalty's value, never its gradient) differs.

    Args:
        importances: ``importances[t][k]``: task ``t``'s importance of parameter ``k``.
        anchors: ``anchors[t][k]``: task ``t``'s anchor of parameter ``k``.

    Returns:
        ``(S, a)``, one tensor per parameter each.
    """
    if len(importances) != len(anchors) or not importances:
        raise ValueError(f"need as many anchors as importances (>= 1), got {len(importances)} and {len(anchors)}")
    total, anchor = [], []
    for k in range(len(importances[0])):
        s, moment = importances[0][k].clone(), importances[0][k] * anchors[0][k]
        for f, a in zip(importances[1:], anchors[1:]):
            s, moment = s + f[k], moment + f[k] * a[k]
        total.append(s)
        anchor.append(torch.where(s > 0, moment / s, torch.zeros_like(moment)))  # 0/0 where S = 0: discarded
    return total, anchor
