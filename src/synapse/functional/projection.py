"""Gradient projections: A-GEM's (one constraint) and GEM's (one per past task, through its dual QP)."""

from __future__ import annotations

import math
from functools import cache
from typing import Union

import torch
from torch import Tensor

__all__ = ["project_conflicting_", "gem_dual", "gem_project", "gem_project_", "GEM_EXACT_LIMIT", "GEM_QP_ITERATIONS"]

# gem_dual solves exactly by trying every support of the solution: 2**t small linear solves in one batched
# call (about 2 ms on one CPU core at t = 10, 18 ms at t = 12). Past this many constraints it iterates.
GEM_EXACT_LIMIT = 10
# Accelerated projected-gradient iterations of gem_dual's fallback beyond GEM_EXACT_LIMIT constraints.
GEM_QP_ITERATIONS = 500


def project_conflicting_(grad: Tensor, reference: Tensor, eps: float = 1e-12) -> Tensor:
    """A-GEM's projection (Chaudhry et al. 2019, eq. 11), in place on the flat ``grad``.

    ``g <- g - (g.r / r.r) r`` when ``g.r < 0``, otherwise ``g`` unchanged. The branch is a clamp, so
    there is no host sync.
    """
    dot = torch.dot(grad, reference)
    coef = dot.clamp(max=0) / torch.dot(reference, reference).clamp_min(eps)
    return grad.addcmul_(reference, coef, value=-1)


@cache
def _supports(t: int, device: torch.device) -> Tensor:
    """Every subset of ``range(t)`` as a ``(2**t, t)`` float64 0/1 mask; row 0 is the empty set."""
    codes = torch.arange(2**t, device=device)
    return ((codes.unsqueeze(1) >> torch.arange(t, device=device)) & 1).to(torch.float64)


@cache
def _momenta(iterations: int) -> tuple:
    """FISTA's extrapolation weights ``(theta_k - 1) / theta_{k+1}`` (host floats, fixed in advance)."""
    theta, weights = 1.0, []
    for _ in range(iterations):
        following = (1.0 + math.sqrt(1.0 + 4.0 * theta * theta)) / 2.0
        weights.append((theta - 1.0) / following)
        theta = following
    return tuple(weights)


def _face_minimisers(gram: Tensor, linear: Tensor, masks: Tensor) -> Tensor:
    """For each 0/1 row ``m`` of ``masks``, the minimiser of ``1/2 u'Pu + c'u`` with ``u_i = 0`` where
    ``m_i = 0``: ``u_F = -P_FF^{-1} c_F``, as one batched solve of ``(m m' * P + diag(1 - m)) u = -m * c``."""
    systems = masks.unsqueeze(-1) * gram * masks.unsqueeze(-2) + torch.diag_embed(1.0 - masks)
    # solve_ex with check_errors=False never reads the device's error flag (torch.linalg.solve would sync).
    solution = torch.linalg.solve_ex(systems, (-masks * linear).unsqueeze(-1), check_errors=False)[0]
    return solution.squeeze(-1) * masks


def _objective(gram: Tensor, linear: Tensor, u: Tensor) -> Tensor:
    """``1/2 u'Pu + c'u`` for each row of ``u``."""
    return 0.5 * ((u @ gram) * u).sum(-1) + (u * linear).sum(-1)


def _best_feasible(gram: Tensor, linear: Tensor, candidates: Tensor) -> Tensor:
    """The candidate row with ``u >= 0`` and the lowest objective (row 0 must be feasible)."""
    feasible = ((candidates >= 0) & candidates.isfinite()).all(-1)
    objective = _objective(gram, linear, candidates).masked_fill(~feasible, math.inf)
    # index_select, not candidates[i]: indexing with a 0-d device tensor reads it on the host.
    return candidates.index_select(0, objective.argmin().unsqueeze(0))[0]


def gem_dual(gram: Tensor, dots: Tensor, margin: float = 0.0, *, exact_limit: int = GEM_EXACT_LIMIT) -> Tensor:
    """GEM's dual QP (Lopez-Paz & Ranzato 2017, eq. 11, with the authors' margin as a lower bound):

        ``v* = argmin_v 1/2 v' gram v + dots' v``  subject to  ``v >= margin``,

    with ``gram = G G'`` (positive definite: GEM adds ``eps I``) and ``dots = G g`` for the ``(t, p)``
    matrix ``G`` of past-task gradients and the current gradient ``g``. Substituting ``v = margin + u``
    leaves ``min 1/2 u' P u + c' u`` over ``u >= 0`` with ``P = gram`` and ``c = dots + margin * gram 1``.

    Up to ``exact_limit`` constraints the solution is exact: it is the minimiser on the face of the
    orthant spanned by its own support, and every such face minimiser that is feasible is a feasible
    point, so ``v*`` is the feasible face minimiser with the lowest objective. All ``2**t`` faces are
    solved in one batched call and the choice is an ``argmin`` on the device: no host sync, no
    data-dependent iteration count. (The empty face, ``u = 0``, is always feasible, so there is always
    an answer; with ``margin = 0`` and ``dots >= 0`` it is the answer.)

    Beyond ``exact_limit`` (2**t solves would cost too much) the QP is solved approximately: FISTA
    (accelerated projected gradient, step ``1 / ||P||_F``) for :data:`GEM_QP_ITERATIONS` iterations,
    then the face minimiser on the support it found, kept when feasible with a lower objective. That
    polish makes the result exact whenever the iterations identified the right support.

    Args:
        gram: ``(t, t)`` symmetric positive definite.
        dots: ``(t,)``.
        margin: the lower bound on ``v`` (GEM's ``gamma``), ``>= 0``.
        exact_limit: the largest ``t`` solved exactly.

    Returns:
        ``v*``, ``(t,)``, in ``gram``'s dtype.
    """
    t = gram.shape[0]
    if gram.shape != (t, t) or dots.shape != (t,):
        raise ValueError(f"gram must be (t, t) and dots (t,), got {tuple(gram.shape)} and {tuple(dots.shape)}")
    if t == 0:
        return dots.clone()
    linear = dots + margin * gram.sum(1) if margin else dots
    if t <= exact_limit:
        masks = _supports(t, gram.device).to(gram.dtype)
        u = _best_feasible(gram, linear, _face_minimisers(gram, linear, masks))
    else:
        step = 1.0 / torch.linalg.matrix_norm(gram).clamp_min(
            torch.finfo(gram.dtype).tiny
        )  # ||P||_F >= its top eigenvalue
        u = torch.zeros_like(linear)
        y = u
        for weight in _momenta(GEM_QP_ITERATIONS):
            following = (y - step * (gram @ y + linear)).clamp_(min=0)
            y = following + weight * (following - u)
            u = following
        polished = _face_minimisers(gram, linear, (u > 0).to(gram.dtype).unsqueeze(0))
        u = _best_feasible(gram, linear, torch.stack([u, polished[0]]))
    return u + margin if margin else u


def gem_project_(grad: Tensor, references: Tensor, margin: float = 0.5, eps: Union[float, Tensor] = 1e-3) -> Tensor:
    """GEM's projection (Lopez-Paz & Ranzato 2017, eqs. 10-11), in place on the flat ``grad``.

    With ``G = references`` (one past task's gradient per row) and ``g = grad``: if some constraint
    ``<g, g_k> >= 0`` is violated, ``g <- G' v* + g`` with ``v*`` from :func:`gem_dual` on
    ``gram = G G' + eps I`` and ``dots = G g``; otherwise ``g`` is left exactly as it is (the authors'
    code projects only on a violation, which matters when ``margin > 0``). The QP runs in float64.
    The choice is a multiplication by the violation flag on the device, never a Python branch.

    Args:
        grad: ``(p,)`` the current gradient, overwritten.
        references: ``(t, p)`` the past tasks' gradients.
        margin: GEM's ``gamma`` (the authors' ``memory_strength``), the QP's lower bound on ``v``.
        eps: added to the diagonal of ``G G'`` (the authors' ``1e-3``). A tensor works too: GEM passes
            ``1e-3 * scale**2`` under a GradScaler, so that scaled gradients give the same ``v*``.
    """
    if references.dim() != 2 or grad.shape != references.shape[1:]:
        raise ValueError(
            f"grad must be (p,) and references (t, p), got {tuple(grad.shape)} and {tuple(references.shape)}"
        )
    if references.shape[0] == 0:
        return grad
    dots = references @ grad
    gram = (references @ references.T).to(torch.float64)
    gram.diagonal().add_(eps)
    v = gem_dual(gram, dots.to(torch.float64), margin) * (dots < 0).any()
    return grad.addmv_(references.T, v.to(grad.dtype))


def gem_project(grad: Tensor, references: Tensor, margin: float = 0.5, eps: Union[float, Tensor] = 1e-3) -> Tensor:
    """:func:`gem_project_` on a copy of ``grad``: GEM's projected gradient ``G' v* + g``."""
    return gem_project_(grad.clone(), references, margin, eps)
